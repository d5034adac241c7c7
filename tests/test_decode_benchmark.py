"""`python -m simvlm_jax.benchmark decode`: runs against open_clip's generate and our greedy
decoder reproduces open_clip's greedy captions token for token (same converted weights)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from simvlm_jax import decode_benchmark  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_agreement_cuts_at_eos():
    eot = decode_benchmark.EOT
    ours = [[5, 6, eot, 0], [5, 6, 7, 8], [1, 2, 3, 4]]
    theirs = [[5, 6, eot, 9], [5, 6, 7, eot], [1, 2, 9, 4]]
    assert decode_benchmark._agreement(ours, theirs, 3) == pytest.approx(2 / 3)  # pylint: disable=protected-access


@pytest.mark.slow
def test_decode_benchmark_cli_matches_open_clip_greedy():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    out = subprocess.run(
        [sys.executable, "-m", "simvlm_jax.benchmark", "decode", "--open_clip_model", "tiny",
         "--decode_batch", "2", "--decode_len", "6", "--repeats", "1", "--num_beams", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["open_clip_model"] == "tiny" and result["batch"] == 2
    for strategy in ("beam", "greedy"):
        r = result[strategy]
        assert r["ours_captions_per_sec"] > 0 and r["open_clip_captions_per_sec"] > 0
        assert r["speedup"] == pytest.approx(r["ours_captions_per_sec"] / r["open_clip_captions_per_sec"])
    # Same weights, same images: greedy decoding must give open_clip's captions exactly.
    assert result["greedy"]["token_agreement"] == 1.0


def test_unknown_strategy_is_a_clear_error():
    args = argparse.Namespace(open_clip_model="tiny", strategies="nucleus", num_beams=2, decode_len=4,
                              decode_batch=1, repeats=1, threads=0)
    with pytest.raises(ValueError, match="nucleus"):
        decode_benchmark.run(args)
