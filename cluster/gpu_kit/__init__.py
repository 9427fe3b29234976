"""The GPU kit: what an air-gapped GPU node needs beyond its image, carried in per-call batches.

wheels.txt pins every wheel (sha256); image-packages.txt is what the node's image already has;
left-out.txt says what is not carried and why; requires.txt records the carried wheels' declared
requirements so `closure` proves the set complete offline. `python -m cluster.gpu_kit` fetches and
packs here, install-on-device.sh installs there, and `check` imports everything there before a run.
"""
