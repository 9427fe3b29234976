"""What it means: records → metrics → reports. Never imports Ray or an engine, so every report
can be rebuilt from a run's artifacts alone."""
