"""`make upstream-check`: the conformance suite against the newest transformers (not in CI).

The engine reproduces the `generate` of the locked transformers (MATCHED_TRANSFORMERS). Before
that number moves, this builds a scratch venv with the lock minus transformers, installs the
newest release (or --spec), runs every test that compares the engine with transformers, and
prints which generate options changed behaviour, so an upgrade is a decision made on evidence.

    python -m tests.conformance.upstream_check [--spec "transformers==5.26.0"] [--venv DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from app.engine.transformers_version import MATCHED_TRANSFORMERS

REPO = Path(__file__).resolve().parents[2]
# Every test that holds the engine to transformers' own generate, processors or forward.
CONFORMANCE_TESTS = [
    "tests/conformance",
    "tests/unit/test_engine_groups.py",
    "tests/unit/test_beam_stop_strings.py",
    "tests/unit/test_sampler.py",
    "tests/unit/test_sampler_fast_paths.py",
    "tests/unit/test_sampler_top_k_rows.py",
    "tests/unit/test_logits_options.py",
    "tests/unit/test_gpt2_paged.py",
]
OPTION_NAME = re.compile(r"['\"]?([a-z_]+)['\"]?\s*[:=]")


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def make_venv(venv: Path, spec: str, torch_spec: str) -> str:
    """The lock without transformers, then `spec` with whatever newer dependencies it needs."""
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    run([*pip, *shlex.split(torch_spec)])
    lock = (REPO / "requirements/dev.lock").read_text(encoding="utf-8")
    # a pin and its hash lines are one logical line (backslash continuations)
    entries = lock.replace("\\\n", " ").splitlines()
    kept = [e for e in entries if not re.match(r"^transformers==", e)]
    without = venv / "lock-without-transformers.txt"
    without.write_text("\n".join(kept) + "\n", encoding="utf-8")
    run([*pip, "--require-hashes", "--no-deps", "-r", str(without)])
    run([*pip, "--require-hashes", "--no-deps", "-r", str(REPO / "requirements/no-deps.lock")])
    run([*pip, "--upgrade", spec])
    done = run(
        [str(venv / "bin/python"), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
    )
    return done.stdout.strip()


def known_options() -> set[str]:
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict()) | {"seed", "stop_strings", "negative_prompt"}


def options_of(test_id: str, message: str, names: set[str]) -> list[str]:
    """The generate options a failed test exercised: from its id's brackets, else from the
    options it printed in its failure."""
    found: list[str] = []
    if "[" in test_id:
        found = [p for p in test_id[test_id.index("[") + 1 : -1].split(",") if p in names]
    if not found:  # the traceback shows the failing call's arguments: `options = {...}`
        shown = re.search(r"^options = (\{.*\})$", message, re.M)
        found = [n for n in OPTION_NAME.findall(shown.group(1) if shown else message) if n in names]
    ignore = {"max_new_tokens", "max_length", "seed"}
    return sorted({n for n in found if n not in ignore}) or ["(no option named)"]


def report(junit: Path, installed: str) -> int:
    cases = ET.parse(junit).getroot().iter("testcase")
    names = known_options()
    changed: dict[str, list[str]] = defaultdict(list)
    total = failed = 0
    for case in cases:
        total += 1
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            continue
        failed += 1
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        message = (problem.get("message") or "") + (problem.text or "")
        for option in options_of(case.get("name", ""), message, names):
            changed[option].append(test_id)
    print()
    print(f"upstream-check: the engine matches transformers {MATCHED_TRANSFORMERS} (locked);")
    print(
        f"                tested against transformers {installed}: {total} tests, {failed} failed"
    )
    if not failed:
        print("no generate option changed behaviour")
        return 0
    print("options whose behaviour changed (the failing tests):")
    for option, tests in sorted(changed.items()):
        print(f"  {option}:")
        for test in tests:
            print(f"    {test}")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="transformers", help="pip spec (default: newest)")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument("--venv", type=Path, help="a venv folder to (re)make and keep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kogpt-upstream-") as scratch:
        venv = args.venv or Path(scratch) / "venv"
        installed = make_venv(venv, args.spec, args.torch_spec)
        junit = Path(scratch) / "junit.xml"
        cmd = [str(venv / "bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["-m", "not slow and not gpu", f"--junitxml={junit}", *CONFORMANCE_TESTS]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, cwd=REPO, env=env, check=False)
        return report(junit, installed)


if __name__ == "__main__":
    sys.exit(main())
