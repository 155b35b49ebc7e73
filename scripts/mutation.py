"""Mutation testing of the core modules with mutmut, and the per-module score against the explained survivors.

Why a script around mutmut: mutmut reports mutants by generated names (``module.x_func__mutmut_12``) that
change whenever the code above them changes, and it has no notion of an *equivalent* mutant (one no test can
kill because the program behaves the same). This script keys every surviving mutant by its function and the
line it changed, matches it against ``tests/mutation_equivalents.yaml`` (each entry says why the mutant is
equivalent), and prints, per module, the score the team tracks::

    score = killed / (mutants - equivalent)       killed includes timeouts and crashes

Usage (from the repository root; the modules and the tests are set in ``[tool.mutmut]`` of pyproject.toml)::

    .venv/bin/python scripts/mutation.py run                   # every core module (about two hours here)
    .venv/bin/python scripts/mutation.py run kernels.tt_cache  # one module (mutmut name globs work too)
    .venv/bin/python scripts/mutation.py run --survivors       # after adding tests: re-check the last survivors
    .venv/bin/python scripts/mutation.py report                # the table from the last run, and the survivors
    .venv/bin/python scripts/mutation.py report --markdown     # the same as the table in docs/testing.md

``run`` starts from a clean ``mutants/`` folder unless ``--keep`` is given, so results always belong to the
code and tests of the working tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EQUIVALENTS_FILE = REPO / "tests" / "mutation_equivalents.yaml"
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
TARGET = 0.90


@dataclass(frozen=True)
class Mutant:
    name: str  # mutmut's, e.g. kernels.tt_cache.x_count_rows__mutmut_10
    module: str  # kernels.tt_cache
    function: str  # count_rows, or TTEmbeddingBag.forward
    status: str  # killed / survived / timeout / no tests / ...
    change: str  # "- old line  + new line", whitespace collapsed: the key of an equivalent mutant

    @property
    def key(self) -> str:
        return f"{self.module}:{self.function}: {self.change}"


def _split_name(name: str) -> tuple[str, str]:
    """``pkg.mod.xǁClassǁmethod__mutmut_3`` -> (``pkg.mod``, ``Class.method``)."""
    stem = name.rsplit("__mutmut_", 1)[0]
    module, _, func = stem.rpartition(".")
    if func.startswith("xǁ"):
        func = func[2:].replace("ǁ", ".")
    elif func.startswith("x_"):
        func = func[2:]
    return module, func


def _change(diff: str) -> str:
    """The removed and added lines of a mutant's diff, whitespace collapsed."""
    removed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return re.sub(r"\s+", " ", f"- {' | '.join(removed)} + {' | '.join(added)}").strip()


def load_mutants() -> list[Mutant]:
    """Every mutant of the last run, read from ``mutants/`` through mutmut's own data classes."""
    if not (REPO / "mutants").is_dir():
        raise SystemExit("no mutants/ folder: run `python scripts/mutation.py run` first")
    os.chdir(REPO)
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    mutants = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            module, function = _split_name(name)
            change = _change(get_diff_for_mutant(name, path=path)) if status not in KILLED else ""
            mutants.append(Mutant(name, module, function, status, change))
    return mutants


@dataclass
class Equivalents:
    """Mutants explained as equivalent: exact keys, and patterns for a recurring kind (each with its reason)."""

    exact: dict[str, str]
    patterns: list[tuple[re.Pattern, str]]

    def reason(self, key: str) -> str | None:
        if key in self.exact:
            return self.exact[key]
        return next((why for pattern, why in self.patterns if pattern.search(key)), None)


def load_equivalents() -> Equivalents:
    """Entries of ``tests/mutation_equivalents.yaml``: ``{mutant: KEY, why}`` or ``{pattern: REGEX, why}``."""
    exact, patterns = {}, []
    entries = yaml.safe_load(EQUIVALENTS_FILE.read_text()) if EQUIVALENTS_FILE.exists() else []
    for entry in entries or []:
        if not entry.get("why"):
            raise SystemExit(f"{EQUIVALENTS_FILE}: entry {entry} has no 'why'")
        if "pattern" in entry:
            patterns.append((re.compile(entry["pattern"]), entry["why"]))
        else:
            exact[re.sub(r"\s+", " ", entry["mutant"]).strip()] = entry["why"]
    return Equivalents(exact, patterns)


def summarise(mutants: list[Mutant], equivalents: Equivalents) -> tuple[list[dict], list[Mutant]]:
    """Per-module counts and score; the survivors that no equivalent entry explains."""
    by_module: dict[str, Counter] = defaultdict(Counter)
    unexplained = []
    for m in mutants:
        counts = by_module[m.module]
        counts["mutants"] += 1
        if m.status == "not checked":  # the run was stopped or restricted to other modules
            counts["pending"] += 1
        elif m.status in KILLED:
            counts["killed"] += 1
        elif equivalents.reason(m.key) is not None:
            counts["equivalent"] += 1
        else:
            counts[m.status.replace(" ", "_")] += 1
            unexplained.append(m)
    rows = []
    for module in sorted(by_module):
        c = by_module[module]
        live = c["mutants"] - c["equivalent"] - c["pending"]
        if live + c["equivalent"] == 0:
            continue  # not run
        rows.append(
            {
                "module": module,
                "mutants": c["mutants"],
                "killed": c["killed"],
                "equivalent": c["equivalent"],
                "survived": c["survived"],
                "no_tests": c["no_tests"],
                "other": live - c["killed"] - c["survived"] - c["no_tests"],
                "pending": c["pending"],
                "score": c["killed"] / live if live else 1.0,
            }
        )
    return rows, unexplained


def table(rows: list[dict], markdown: bool) -> str:
    cols = ["module", "mutants", "killed", "equivalent", "survived", "no_tests", "other", "pending", "score"]
    fmt = [(r["module"], *(str(r[c]) for c in cols[1:-1]), f"{r['score']:.1%}") for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| `" + f[0] + "` | " + " | ".join(f[1:]) + " |" for f in fmt])
    widths = [max(len(c), *(len(f[i]) for f in fmt)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(f, widths, strict=True)) for f in fmt]
    return "\n".join(lines)


def run(targets: list[str], keep: bool) -> int:
    """``mutmut run`` over the core modules (or the given modules / name globs), from a clean folder."""
    if not keep:
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
    names = [t if ("*" in t or "__mutmut_" in t) else f"{t}.*" for t in targets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # forked workers must not inherit an OpenMP pool
    env.setdefault("RECSYS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(mutmut), "run", *names], cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run mutmut, then print the report")
    p_run.add_argument("targets", nargs="*", help="modules (kernels.tt_cache) or mutmut name globs; default all")
    p_run.add_argument("--keep", action="store_true", help="keep mutants/ and its results from the last run")
    p_run.add_argument(
        "--survivors",
        action="store_true",
        help="re-check only the unexplained survivors of the last run (name any changed functions as targets), keeping "
        "every other result: what to run after adding the tests that should kill them",
    )
    p_report = sub.add_parser("report", help="print the per-module score of the last run and its survivors")
    p_report.add_argument("--markdown", action="store_true", help="the table as markdown (docs/testing.md)")
    args = parser.parse_args(argv)
    if args.command == "run":
        targets = args.targets
        if args.survivors:
            _, unexplained = summarise(load_mutants(), load_equivalents())
            targets = [m.name for m in unexplained] + targets
            print(f"re-checking {len(unexplained)} unexplained survivors")
        code = run(targets, args.keep or args.survivors)
        if code != 0:
            return code
    rows, unexplained = summarise(load_mutants(), load_equivalents())
    print(table(rows, markdown=getattr(args, "markdown", False)))
    for m in unexplained:
        print(f"\n{m.status}: {m.name}\n  mutant: {m.key!r}")
    below = [r["module"] for r in rows if r["score"] < TARGET]
    if below:
        print(f"\nbelow the {TARGET:.0%} target: {', '.join(below)}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
