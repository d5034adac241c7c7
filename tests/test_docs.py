"""The docs cannot rot: every shell command and gin snippet in README.md and docs/*.md runs as
written on a one-device CPU machine, paths aside, with tiny settings.

Each command is extracted from the Markdown, its documented paths (`/data/...`, `/ckpt/...`)
are pointed at small generated data, the settings listed in TINY are added or substituted
(fewer steps, a tiny model for a paper-sized one, fewer images), and it runs in a subprocess
with ONE CPU device, from an empty working directory, in document order (later commands use
what earlier ones wrote, as a reader's would). A command no rule below covers fails the test:
add it to RULES when you document a new one. Gin snippets that are whole run files run; the
others are parsed (every binding must name a real configurable and parameter).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, compile_cache_env

DOC_FILES = ["README.md", *sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))]

# Tiny-run overrides appended to every `python -m simvlm_jax.main` command.
MAIN_TINY = ("--gin.NUM_STEPS=2 --gin.BATCH_SIZE=8 --gin.train.log_every=1 --gin.make_manager.save_every=2 "
             "--gin.prepare_builtin.num_train=200 --gin.prepare_builtin.num_heldout=16 "
             "--gin.prepare_builtin.num_text=300 --gin.evaluate_captioning.max_examples=8 "
             "--gin.evaluate_captioning.batch_size=8 --gin.evaluate_captioning.with_constant_baseline=False "
             "--gin.make_train_iterator.num_threads=1")

# (regex on the command, what to do). Actions: "run" (with substitutions), or "skip: reason".
RULES: list[tuple[str, str]] = [
    (r"^bash tests/run\.sh", "skip: the test suite itself"),
    (r"^bash launch/demo\.sh", "run"),
    (r"^python -m simvlm_jax\.main (?!--gin_file=gin/(flamingo|coca)_demo\.gin)", "run"),
    (r"^python -m simvlm_jax\.main --gin_file=gin/coca_demo\.gin",
     "skip: tests/test_coca_cli.py runs these documented commands (tiny settings appended) and checks them"),
    (r"^python -m simvlm_jax\.main --gin_file=gin/flamingo_demo\.gin",
     "skip: tests/test_flamingo_family.py runs it (tiny settings, 0- and 4-shot eval, export, caption CLI)"),
    (r"^python -m simvlm_jax\.data\.tokenizer ", "run"),
    (r"^python -m simvlm_jax\.data\.convert ", "run"),
    (r"^python -m simvlm_jax\.benchmark (memory|step|data|decode) ", "run"),
    (r"^python -m simvlm_jax\.benchmark aot ", "skip: tests/test_aot.py runs it (tiny model, 8 chips) and checks its output"),
    (r"^python -m simvlm_jax\.benchmark gpu-suite ", "skip: tests/test_gpu_suite.py runs its --smoke mode and checks its files"),
    (r"^python -m simvlm_jax\.benchmark train-compare ",
     "skip: tests/test_gpu_suite.py runs it (tiny open_clip CoCa, through the suite) and checks both sides"),
    (r"^python -m simvlm_jax\.profile_summary ", "skip: tests/test_profile_summary.py runs the CLI on a fresh trace"),
    (r"^python -m simvlm_jax\.caption ", "run"),
    (r"^python -m simvlm_jax\.zero_shot ", "run"),
    (r"^python -m simvlm_jax\.model_table", "skip: tests/test_flops.py runs it and compares with docs/models.md"),
    (r"^python -m simvlm_jax\.launch (tpu-vm|xpk|slurm) .*--dry_run$", "run"),  # prints, runs nothing
    (r"^python -m simvlm_jax\.launch local ",
     "skip: tests/test_launch_local.py runs this documented command (its own settings appended)"),
]

# Substitutions (regex -> replacement) applied to commands and run files: tiny stand-ins for
# paper-sized settings. Paths are handled separately (`_paths`).
TINY: list[tuple[str, str]] = [
    (r"models/simvlm_(base|large|huge)\.gin", "models/simvlm_tiny.gin"),
    (r"--devices=64", "--devices=8"),
    (r"--batch_size=(4096|256)", "--batch_size=8"),
    (r"--hbm_gib=80", "--hbm_gib=1"),
    (r"--vocab_size 32000", "--vocab_size 300"),
    (r"--open_clip_model coca_ViT-B-32", "--open_clip_model tiny --decode_batch 2 --decode_len 4 --repeats 1"),
    (r"--data_rounds 5", "--data_rounds 1 --data_num_images 16 --data_passes 1 --data_image_size 64 "
                         "--data_source_size 80"),
    (r"--shard_size 100000", "--shard_size 100"),
    (r"^NUM_STEPS = \d+", "NUM_STEPS = 2"),
    (r"^BATCH_SIZE = \d+", "BATCH_SIZE = 8"),
    (r"^SimVLMConfig.vocab_size = 32000", "SimVLMConfig.vocab_size = 300"),  # the tiny tokenizer's
]


def code_blocks() -> list[tuple[str, str, str]]:
    """(file, language, text) of every fenced code block of the docs."""
    blocks = []
    for name in DOC_FILES:
        with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
            text = f.read()
        blocks += [(name, m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]
    return blocks


def shell_commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and `[optional]` args
    (shown in brackets) kept as real args."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(re.sub(r"\[([^\]]*--[^\]]*)\]", r"\1", line))
    return commands


def documented_command(pattern: str) -> list[str]:
    """The args of the one documented command matching `pattern` (for tests that run a documented
    command themselves, with tiny settings appended, so the docs test can skip it)."""
    commands = {c for _, lang, text in code_blocks() if lang == "bash" for c in shell_commands(text)
                if re.search(pattern, c)}
    assert len(commands) == 1, f"{len(commands)} documented commands match {pattern!r}: {commands}"
    return shlex.split(commands.pop())


def action_for(command: str) -> str:
    matches = [action for pattern, action in RULES if re.search(pattern, command)]
    assert len(matches) == 1, f"no rule (or several) in tests/test_docs.py RULES for: {command}"
    return matches[0]


def test_every_documented_command_has_a_rule():
    """Fast: a newly documented command must be added to RULES (so the slow test runs it)."""
    commands = [c for _, lang, text in code_blocks() if lang == "bash" for c in shell_commands(text)]
    assert len(commands) >= 20
    for command in commands:
        action_for(command)


def _tiny(text: str) -> str:
    for pattern, repl in TINY:
        text = re.sub(pattern, repl, text, flags=re.M)
    return text


def _paths(text: str, root: str) -> str:
    """Documented absolute paths -> the generated ones under `root`."""
    text = re.sub(r"(?<![\w.])/(data|ckpt)/", lambda m: f"{root}/{m.group(1)}/", text)
    return re.sub(r"--export_dir DIR\b", "--export_dir demo_out/run/export", text)


def _make_fixtures(root: str, cwd: str) -> None:
    """The files the documented paths point to, made from the built-in data the demo prepared
    (cwd/demo_out/data): tar shards, a text corpus, COCO/Karpathy json + images, parquet, an
    ImageFolder, images to caption, class names and templates."""
    import numpy as np
    from PIL import Image
    import pyarrow as pa
    import pyarrow.parquet as pq
    from simvlm_jax.data import sources

    builtin = os.path.join(cwd, "demo_out", "data")
    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    os.symlink(builtin, os.path.join(data, "builtin"))
    os.symlink(os.path.join(builtin, "train"), os.path.join(data, "laion"))
    os.symlink(os.path.join(builtin, "text"), os.path.join(data, "c4"))
    os.symlink(os.path.join(builtin, "heldout"), os.path.join(data, "coco_karpathy_test"))
    held = sources.TarShardSource(os.path.join(builtin, "heldout", "*.tar"))
    samples = [held[i] for i in range(12)]
    # Karpathy dataset_coco.json + /data/coco/val2014/*.jpg
    os.makedirs(os.path.join(data, "coco", "val2014"))
    images = []
    for i, s in enumerate(samples):
        name = f"COCO_val2014_{i:012d}.jpg"
        with open(os.path.join(data, "coco", "val2014", name), "wb") as f:
            f.write(s["jpg"])
        images.append({"filepath": "val2014", "filename": name, "cocoid": i,
                       "split": ("train", "restval", "test")[i % 3],
                       "sentences": [{"raw": s["txt"].decode()}]})
    with open(os.path.join(data, "coco", "dataset_coco.json"), "w", encoding="utf-8") as f:
        json.dump({"images": images}, f)
    # /data/cc3m/*.parquet
    os.makedirs(os.path.join(data, "cc3m"))
    pq.write_table(pa.table({"jpg": [s["jpg"] for s in samples], "caption": [s["txt"].decode() for s in samples]}),
                   os.path.join(data, "cc3m", "part0.parquet"))
    # /data/imagenet_val: an ImageFolder of 2 classes
    rng = np.random.default_rng(0)
    for cls in ("red_circle", "blue_square"):
        os.makedirs(os.path.join(data, "imagenet_val", cls))
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                os.path.join(data, "imagenet_val", cls, f"{j}.jpg"))
    with open(os.path.join(cwd, "names.txt"), "w", encoding="utf-8") as f:
        f.write("red circle\nblue square\n")
    with open(os.path.join(cwd, "templates.txt"), "w", encoding="utf-8") as f:
        f.write("a picture of a {}.\n")
    with open(os.path.join(cwd, "img1.jpg"), "wb") as f:
        f.write(samples[0]["jpg"])
    Image.open(os.path.join(data, "coco", "val2014", images[1]["filename"])).save(os.path.join(cwd, "img2.png"))


def _is_run_file(body: str) -> bool:
    return bool(re.search(r"^include ", body, re.M) and re.search(r"^WORK_DIR = ", body, re.M))


def _run_file_name(body: str) -> str | None:
    """`my_run.gin` of a run file whose first line is `# my_run.gin`."""
    first = body.strip().splitlines()[0]
    return first[2:].strip() if first.startswith("# ") and first.endswith(".gin") else None


def _run(command: str, cwd: str, env: dict) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    TIMES.append(f"{time.time() - t0:6.1f} s  {command[:160]}")  # printed at the end: where the time goes
    return proc


TIMES: list[str] = []


@pytest.mark.slow
def test_documented_commands_and_gin_run_as_written(tmp_path):
    from simvlm_jax.cli import load_gin
    import gin
    from simvlm_jax import experiment  # noqa: F401  (registers the configurables gin snippets bind)

    root, cwd = str(tmp_path / "root"), str(tmp_path / "project")
    os.makedirs(cwd)
    env = dict(os.environ)
    # One CPU device, as a new user's machine; no compile-time LLVM optimization (faster).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env["PYTHONHASHSEED"] = "0"
    env.update(compile_cache_env())
    ran, parsed, skipped = [], 0, []
    done = set()
    for _, lang, text in code_blocks():
        body = _paths(text, root)
        if lang == "gin" and _is_run_file(body) and _run_file_name(body):
            with open(os.path.join(cwd, _run_file_name(body)), "w", encoding="utf-8") as f:
                f.write(_tiny(body))
    for name, lang, text in code_blocks():
        if lang == "gin" or (lang == "" and "=" in text and "python" not in text):
            body = _paths(text, root)
            if _is_run_file(body):
                # A whole run file: saved (as the name its first comment gives, if any; those are
                # written up front, as a reader copies them before the commands using them) and run.
                fname = _run_file_name(body) or "run_file.gin"
                with open(os.path.join(cwd, fname), "w", encoding="utf-8") as f:
                    f.write(_tiny(body))
                if fname == "run_file.gin":
                    command = f"python -m simvlm_jax.main --gin_file={fname} --mode=train {MAIN_TINY}"
                    proc = _run(command, cwd, env)
                    assert proc.returncode == 0, (name, command, proc.stderr[-4000:])
                    ran.append(command)
            else:  # a fragment: every binding must be valid
                fragment = os.path.join(str(tmp_path), f"fragment_{parsed}.gin")
                with open(fragment, "w", encoding="utf-8") as f:
                    f.write(body)
                gin.clear_config()
                try:
                    load_gin([fragment], [])
                finally:
                    gin.clear_config()
                parsed += 1
            continue
        if lang != "bash":
            continue
        for command in shell_commands(text):
            action = action_for(command)
            if action.startswith("skip"):
                skipped.append((command, action))
                continue
            if command in done:  # the same command documented twice (README and docs/)
                continue
            done.add(command)
            real = _tiny(_paths(command, root))
            if real.startswith("bash launch/demo.sh"):
                # The demo script runs from the repository; point its outputs at our directory.
                real = (f"bash {REPO_ROOT}/launch/demo.sh {MAIN_TINY} --gin.WORK_DIR=\"'{cwd}/demo_out/run'\" "
                        f"--gin.DATA_DIR=\"'{cwd}/demo_out/data'\"")
                env_demo = dict(env, VENV=os.path.dirname(os.path.dirname(sys.executable)))
                proc = _run(real, cwd, env_demo)
                assert proc.returncode == 0, (name, real, proc.stderr[-4000:])
                _make_fixtures(root, cwd)
                ran.append(real)
                continue
            if real.startswith("python -m simvlm_jax.main "):
                real += " " + MAIN_TINY
            proc = _run(real, cwd, env)
            assert proc.returncode == 0, (name, real, proc.stdout[-2000:], proc.stderr[-4000:])
            ran.append(real)
    assert len(ran) >= 20 and parsed >= 8, (len(ran), parsed)
    # What the commands made: the eval has its own directory; the export holds the model card.
    assert glob.glob(os.path.join(cwd, "demo_out", "run", "eval", "heldout_step*", "report.html"))
    assert os.path.exists(os.path.join(cwd, "demo_out", "run", "export", "MODEL_CARD.md"))
    assert os.path.exists(os.path.join(root, "ckpt", "my_run", "export", "params.safetensors"))
    print("\n".join(["ran:", *TIMES, "skipped:", *(f"{c} ({a})" for c, a in skipped)]))


def test_shell_commands_are_split_correctly():
    assert shlex.split(shell_commands("python -m x --a 1 \\\n  --b 2  # c\n# d\n[--e f]\n")[0]) == \
        ["python", "-m", "x", "--a", "1", "--b", "2"]
    assert shell_commands("python -m y DIR [--classnames n.txt] [--t t.txt]") == \
        ["python -m y DIR --classnames n.txt --t t.txt"]
