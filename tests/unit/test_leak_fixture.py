"""The autouse PAN-leak fixture of tests/conftest.py can fail a test, and says so masked.

Each test runs an inner pytest session in a subprocess whose only conftest loads the real
tests/conftest.py as a plugin, under filterwarnings = error. The inner tests build the PAN from
TEST_PANS, so no inner source line (shown in a traceback) holds the digits. The inner run's
output comes back into this test's output, where the outer fixture scans it: that checks the
failure message names the PAN masked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cards_testdata import TEST_PANS, assert_no_test_pans, masked_hint

ROOT = Path(__file__).resolve().parents[2]


def _run_inner(
    pytester: pytest.Pytester, source: str, *, show_capture: str = "no"
) -> pytest.RunResult:
    pytester.makepyprojecttoml(
        "[tool.pytest.ini_options]\n"
        f"pythonpath = [{str(ROOT)!r}]\n"
        'filterwarnings = ["error"]\n'
        'asyncio_default_fixture_loop_scope = "function"\n'
    )
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    pytester.makepyfile(test_inner="from tests.cards_testdata import TEST_PANS\n\n" + source)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--show-capture={show_capture}"
    )
    assert_no_test_pans(result.stdout.str() + result.stderr.str(), "the inner run's output")
    return result


def test_a_printed_test_pan_fails_the_test(pytester):
    """A test that prints a test PAN errors at teardown, naming the PAN masked."""
    result = _run_inner(pytester, "def test_prints():\n    print(TEST_PANS[0])\n")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*test PAN leaked in stdout: {masked_hint(TEST_PANS[0])}*"])


def test_a_spaced_pan_on_stderr_fails_the_test(pytester):
    """The scan also finds a PAN written in groups of four on stderr."""
    source = (
        "import sys\n\n"
        "def test_writes():\n"
        "    pan = TEST_PANS[1]\n"
        "    sys.stderr.write(' '.join(pan[i : i + 4] for i in range(0, 16, 4)))\n"
    )
    result = _run_inner(pytester, source)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*test PAN leaked in stderr: {masked_hint(TEST_PANS[1])}*"])


def test_output_the_test_reads_itself_is_still_scanned(pytester):
    """A test that consumes capsys output with readouterr() cannot hide a PAN from the scan."""
    source = (
        "def test_reads(capsys):\n"
        "    print('-'.join(TEST_PANS[0]))\n"
        "    assert capsys.readouterr().out\n"
    )
    result = _run_inner(pytester, source)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*test PAN leaked in stdout: {masked_hint(TEST_PANS[0])}*"])


def test_a_stdlib_log_record_with_a_test_pan_fails_the_test(pytester):
    """A log record carrying a test PAN fails the test even though its JSON line is scrubbed."""
    source = (
        "import logging\n\n"
        "def test_logs():\n"
        "    logging.getLogger('grpc._cython.cygrpc').error('bad card %s', TEST_PANS[3])\n"
    )
    result = _run_inner(pytester, source)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [f"*test PAN leaked in log record of grpc._cython.cygrpc: {masked_hint(TEST_PANS[3])}*"]
    )


def test_masked_output_and_scrubbed_structlog_lines_pass(pytester):
    """Printing a masked PAN and logging a raw one through structlog (scrubbed) both pass."""
    source = (
        "import structlog\n\n"
        "def test_masked():\n"
        "    print(TEST_PANS[0][:6] + 'XXXXXX' + TEST_PANS[0][-4:])\n\n"
        "def test_structlog():\n"
        "    structlog.get_logger().info('card_seen', note='pan ' + TEST_PANS[0])\n"
    )
    result = _run_inner(pytester, source)
    result.assert_outcomes(passed=2)


def test_the_output_of_a_failing_test_is_still_shown(pytester):
    """The fixture writes what it read back out, so pytest still reports a failing test's output."""
    source = (
        "def test_fails():\n"
        "    print('masked ' + TEST_PANS[0][:6] + 'XXXXXX' + TEST_PANS[0][-4:])\n"
        "    assert False\n"
    )
    result = _run_inner(pytester, source, show_capture="all")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Captured stdout*", "masked 411111XXXXXX1111"])
