"""Generated files match their sources: the wire constants of the Cython side
(pyx/includes/consts.pxi) and the protocol test vectors (tests/vectors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["gen_consts.py", "make_vectors.py", "make_dict.py"])
def test_generated_file_is_current(script):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_fails_on_drift(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gen_consts

    stale = tmp_path / "consts.pxi"
    stale.write_text(gen_consts.render().replace("FT_BATCH = 0x43", "FT_BATCH = 0x44"))
    assert gen_consts.main(["--check"], out=stale) == 1
    assert gen_consts.main([], out=stale) == 0
    assert gen_consts.main(["--check"], out=stale) == 0


def test_core_constants_agree_with_the_python_table():
    # The compiled core was built from consts.pxi: spot-check it end to end.
    from fanout import _core
    from fanout.protocol import fanout_pb2 as pb
    from fanout.protocol.wire import FrameType

    frame = _core.pack_frame(FrameType.BATCH, b"")
    assert frame[1] == FrameType.BATCH
    with pytest.raises(_core.FrameError) as err:
        _core.parse_frames(bytes([9, 0x43, 0, 0, 0, 0, 0, 0]), 100)
    assert err.value.reason == pb.UNSUPPORTED_VERSION
