"""Reports in a real browser (headless Chromium): every figure renders, nothing is logged as an
error, and nothing is fetched from outside the file."""

import pytest
from browser import ensure_chromium, visit
from test_compare import fake_run
from test_report import packet

from analysis.compare import compare
from analysis.report import write_reports


@pytest.fixture(scope="module")
def chromium():
    try:
        return ensure_chromium()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"headless Chromium unavailable: {e}")


def test_report_renders_offline_without_errors(chromium, tmp_path):
    p = packet(tmp_path)
    write_reports(p)
    seen = visit(chromium, tmp_path / "report.html")
    assert seen.console_errors == [] and seen.external_requests == []
    assert seen.figures >= 4 and seen.rendered_figures == seen.figures


def test_compare_page_renders_offline_without_errors(chromium, tmp_path):
    runs = [fake_run(tmp_path, f"r{n}", "real", n, 1000.0 * n) for n in (1, 2)]
    seen = visit(chromium, compare(runs, tmp_path / "cmp") / "compare.html")
    assert seen.console_errors == [] and seen.external_requests == []
    assert seen.figures >= 3 and seen.rendered_figures == seen.figures


def test_the_check_sees_errors_and_outside_requests(chromium, tmp_path):
    """The browser check itself can fail: a page that fetches from outside and logs an error is caught."""
    p = packet(tmp_path)
    write_reports(p)
    page = (tmp_path / "report.html").read_text()
    bad = page.replace(
        "</body>",
        "<script src='https://cdn.example.com/x.js'></script><script>console.error('boom');"
        "document.querySelector('.plotly-graph-div').innerHTML = ''</script></body>",
    )
    (tmp_path / "bad.html").write_text(bad)
    seen = visit(chromium, tmp_path / "bad.html")
    assert "boom" in " ".join(seen.console_errors)
    assert seen.external_requests == ["https://cdn.example.com/x.js"]
    assert seen.rendered_figures == seen.figures - 1
