"""pytest plugin of bench/sm90_sweep.py: before the tests import seqrec_fast, replace the
Triton interpreter with bench/sm90_report.py's stub driver (launches compile for sm_90 with
the launchers' GPU configurations and do not run)."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sm90_report  # noqa: E402

sm90_report.install_stub()
