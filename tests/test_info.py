"""seqrec_fast.info(): what the install reports matches what actually runs."""
import torch
import torch.distributed as dist

import seqrec_fast
from seqrec_fast import backend


def test_info_reports_the_install():
    info = seqrec_fast.info()
    assert info["seqrec_fast"] == seqrec_fast.__version__
    assert info["torch"] == torch.__version__
    assert info["extension"] == (seqrec_fast._ext._C is not None)
    assert set(info["backends"]) == set(seqrec_fast.OPS)
    for op, flags in info["backends"].items():
        assert flags["eager"] is True
        assert flags["cpp"] == backend.available(op, "cpp", torch.device("cpu"))
    assert ("gloo" in info["distributed"]) == (dist.is_available() and dist.is_gloo_available())
    assert ("nccl" in info["distributed"]) == (dist.is_available() and dist.is_nccl_available())
    assert info["devices"][0] == "cpu"
    assert (len(info["devices"]) > 1) == torch.cuda.is_available()
