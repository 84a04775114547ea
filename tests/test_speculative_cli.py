"""`codegen-jax generate --speculator ...`: the same greedy tokens as plain decoding, acceptance in --json, and
one-line errors for unusable flag combinations."""

import json

import pytest
from conftest import FIXTURES
from flax import nnx

from codegen_jax.cli import main
from drafters.block_drafter import BlockDrafter, BlockDrafterConfig
from drafters.checkpoint import save_drafter
from drafters.eagle3 import Eagle3Config, Eagle3Drafter

PROMPT = "def area(r):\n    return 3.14 * r * r\n\ndef area(r):\n    return"


def run(capsys, *extra):
    argv = ["generate", "--model", str(FIXTURES / "llama"), "--prompt", PROMPT, "--dtype", "float32",
            "--max-new-tokens", "16", "--json", "--quiet", *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    save_drafter(BlockDrafter(BlockDrafterConfig(64, (0, 2), block_size=4, head_dim=16, intermediate_size=64,
                                                 context=16), rngs=nnx.Rngs(0)), root / "block")
    save_drafter(Eagle3Drafter(Eagle3Config(64, (0, 1, 2), 512, 256, draft_len=3, head_dim=16, intermediate_size=64,
                                            context=16), rngs=nnx.Rngs(0)), root / "eagle3")
    return root


PLAIN = {}  # plain decoding's output, run once for the four speculators


@pytest.mark.parametrize("speculator", ["apply", "suffix", "block", "eagle3"])
def test_speculative_cli_matches_plain(capsys, drafter_dirs, speculator):
    if "out" not in PLAIN:
        PLAIN["out"] = run(capsys)
    plain = PLAIN["out"]
    extra = ["--speculator", speculator, "--draft-len", "5"]
    if speculator in ("block", "eagle3"):
        extra += ["--drafter", str(drafter_dirs / speculator)]
    out = run(capsys, *extra)
    assert out["tokens"] == plain["tokens"] and out["text"] == plain["text"]
    assert out["speculator"] == speculator and 1 <= out["target_forwards"] <= len(out["tokens"])
    assert out["tokens_per_forward"] == round(len(out["tokens"]) / out["target_forwards"], 3)
    assert out["acceptance"] == round(out["accepted_tokens"] / out["target_forwards"], 3)


@pytest.mark.parametrize("extra,needle", [
    (["--speculator", "block"], "needs --drafter"),
    (["--speculator", "apply", "--drafter", "x"], "--drafter is for the neural"),
    (["--speculator", "eagle3", "--drafter", "/nonexistent"], "not a drafter checkpoint"),
    (["--speculator", "medusa"], "invalid choice"),
])
def test_speculative_cli_errors(capsys, extra, needle):
    argv = ["generate", "--model", str(FIXTURES / "llama"), "--prompt", "x", "--quiet", *extra]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
