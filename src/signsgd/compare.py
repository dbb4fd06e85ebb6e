"""``signsgd compare``: several training runs in sequence, one table, one overlay plot.

A compare file is TOML like :data:`DEFAULT_COMPARE` (``signsgd compare --print-default``):
a ``[defaults]`` table with any :data:`signsgd.config.COMPARE_KEYS` (underscore or dash
spelling), one ``[[run]]`` table (or ``run`` array entry) per run, each with a ``name`` and
its options, and optional checks, printed as PASS/FAIL under the table: ``run`` with
``min_accuracy`` (a fraction), or ``run``, ``reference`` and ``max_gap`` (the run's accuracy
may be at most ``max_gap`` below the reference's); for language models ``run`` with
``max_loss`` (nats per character), or ``run``, ``reference`` and ``max_loss_gap`` (the
run's validation loss may be at most that much above the reference's). Every key's type is
checked (the message names the key and its table). Each run writes to
``OUT/SLUG-OF-ITS-NAME``; an ``OUT`` that holds an earlier compare's results is refused
(``overwrite`` replaces them), and so is a link in it, where a run's folder or a result
would go.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args, get_type_hints

from signsgd.config import COMPARE_KEYS, TrainConfig, validate
from signsgd.errors import ConfigError, OutputError
from signsgd.outputs import RUN_FILES, lock_run, plot_overlay, read_metrics, write_atomic

__all__ = ["DEFAULT_COMPARE", "parse_compare", "parse_checks", "evaluate_checks",
           "format_table", "compare"]

#: The built-in ``signsgd compare`` configuration: the main demo (see docs/demo.md and
#: docs/tuning.md for how the learning rates were chosen). One thread per worker: on a
#: shared 2-core machine one thread is faster than two (measured in docs/tuning.md).
DEFAULT_COMPARE = """
# Unset momenta are the optimisers' defaults (Signum 0.9, EF-signSGD 0).
run = [
  {name = "Adam", optimizer = "adam", lr = 3e-3},
  {name = "SGD+momentum", optimizer = "sgd", lr = 0.1, momentum = 0.9},
  {name = "Signum", optimizer = "signum", lr = 1e-3, momentum = 0.9},
  {name = "Signum, majority vote", optimizer = "signum", lr = 1e-3, batch_size = 32, workers = 4},
  {name = "EF-signSGD", optimizer = "ef-signsgd", lr = 0.3, batch_size = 32, workers = 4},
  {name = "Lion", optimizer = "lion", lr = 1e-3},
  {name = "Lion, majority vote", optimizer = "lion", lr = 1e-3, batch_size = 32, workers = 4},
]
# The quality bar of the main job (issue 4), checked and printed after the table.
check = [
  {run = "Adam", min_accuracy = 0.89},
  {run = "Signum", reference = "Adam", max_gap = 0.01},
  {run = "Signum, majority vote", reference = "Signum", max_gap = 0.01},
  {run = "EF-signSGD", reference = "SGD+momentum", max_gap = 0.01},
  {run = "Lion", reference = "Adam", max_gap = 0.01},
  {run = "Lion, majority vote", reference = "Lion", max_gap = 0.01},
]

[defaults]
data = "fashion-mnist"
model = "cnn"
epochs = 3
seed = 0
threads = 1
batch_size = 128
workers = 1
"""


def _load_toml(text: str, source: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc


#: What ``signsgd compare`` writes into ``OUT`` besides the runs' folders.
RESULT_FILES = ("table.md", "table.json", "compare.png")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The type a compare key's value must have: (test, words), by the field's type.
_TYPES: dict[Any, tuple[Callable[[Any], bool], str]] = {
    str: (lambda v: isinstance(v, str), "a string"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (_number, "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    tuple[float, float]: (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_number, v)),
                          "two numbers"),
}
_KEY_TYPES = {k: _TYPES[next(a for a in (get_args(h) or (h,)) if a is not type(None))]
              for k, h in get_type_hints(TrainConfig).items() if k in COMPARE_KEYS}


def parse_compare(text: str, source: str = "<built-in default>") -> list[TrainConfig]:
    """The runs of the compare TOML document ``text`` (called ``source`` in error messages),
    as configs (``out`` not yet set).

    Raises:
        ConfigError: bad TOML, no ``[[run]]``, a run or ``[defaults]`` that is not a table,
            unknown keys (the message lists the valid ones), a value of the wrong type (the
            message names the key and the table) or two runs with one name.

    Example:
        >>> parse_compare("[defaults]\\nepochs = 1\\n[[run]]\\noptimizer = 'adam'\\n")[0].name
        'adam-1'
    """
    doc = _load_toml(text, source)
    unknown_top = set(doc) - {"defaults", "run", "check"}
    if unknown_top:
        raise ConfigError(f"{source}: unknown tables {sorted(unknown_top)}; use [defaults] and "
                          "[[run]]")
    runs = doc.get("run")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{source}: no [[run]] tables; add at least one run")

    def norm(table: Any, where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {where} must be a table, got {table!r}")
        for k, v in table.items():
            if k.replace("-", "_") not in COMPARE_KEYS:
                raise ConfigError(f"{source}: unknown option {k!r} in {where}; valid options: "
                                  f"{', '.join(COMPARE_KEYS)}")
            ok, what = _KEY_TYPES[k.replace("-", "_")]
            if not ok(v):
                raise ConfigError(f"{source}: {where}: {k} must be {what}, got {v!r}")
        return {k.replace("-", "_"): v for k, v in table.items()}

    base = norm(doc.get("defaults", {}), "[defaults]")
    configs: list[TrainConfig] = []
    for i, run in enumerate(runs):
        name = run.get("name") if isinstance(run, dict) else None
        opts = {**base, **norm(run, f"run {i + 1}" + (f" ({name!r})" if isinstance(name, str)
                                                        else ""))}
        opts.setdefault("name", f"{opts.get('optimizer', 'signum')}-{i + 1}")
        if any(c.name == opts["name"] for c in configs):
            raise ConfigError(f"{source}: two runs are named {opts['name']!r}; names must differ")
        configs.append(TrainConfig(**opts))
    return configs


_CHECKS = ({"run", "min_accuracy"}, {"run", "reference", "max_gap"}, {"run", "max_loss"},
           {"run", "reference", "max_loss_gap"})


def parse_checks(text: str, source: str = "<built-in default>") -> list[dict[str, Any]]:
    """The ``[[check]]`` tables of a compare document, validated against its run names.

    Raises:
        ConfigError: a check that is not a table, has other keys or values of the wrong type
            (a run's name, a number), or names a run that does not exist.

    Example:
        >>> parse_checks(DEFAULT_COMPARE)[0]
        {'run': 'Adam', 'min_accuracy': 0.89}
    """
    doc = _load_toml(text, source)
    names = {r.get("name") for r in doc.get("run", []) if isinstance(r, dict)}
    checks = doc.get("check", [])
    if not isinstance(checks, list):
        raise ConfigError(f"{source}: 'check' must be an array of tables ([[check]])")
    for i, ch in enumerate(checks):
        if not isinstance(ch, dict):
            raise ConfigError(f"{source}: check {i + 1} must be a table, got {ch!r}")
        if set(ch) not in _CHECKS:
            raise ConfigError(f"{source}: check {i + 1} has keys {sorted(ch)}; use run + "
                              "min_accuracy, run + reference + max_gap, run + max_loss, or "
                              "run + reference + max_loss_gap")
        for key, v in ch.items():
            named = key in ("run", "reference")
            if not (isinstance(v, str) if named else _number(v)):
                raise ConfigError(f"{source}: check {i + 1}: {key} must be "
                                  f"{'the name of a run (a string)' if named else 'a number'}"
                                  f", got {v!r}")
            if named and v not in names:
                raise ConfigError(f"{source}: check {i + 1}: no run named {v!r} "
                                  f"(runs: {', '.join(sorted(map(str, names)))})")
    return checks


def evaluate_checks(checks: list[dict[str, Any]], summaries: list[dict[str, Any]]
                    ) -> list[tuple[bool, str]]:
    """``(passed, line)`` for every check, from the runs' held-out accuracies.

    Example:
        >>> evaluate_checks([{"run": "a", "min_accuracy": 0.5}],
        ...                 [{"name": "a", "test_accuracy": 0.6}])
        [(True, 'PASS  a: 60.00% >= 50.00%')]
    """
    ev = "test" if all("test_accuracy" in r for r in summaries) else "val"
    acc = {r["name"]: r[f"{ev}_accuracy"] for r in summaries}
    loss = {r["name"]: r.get(f"{ev}_loss") for r in summaries}
    out = []
    for ch in checks:
        a = acc[ch["run"]]
        if "max_loss" in ch or "max_loss_gap" in ch:
            la = loss[ch["run"]]
            if "max_loss" in ch:
                ok = la <= ch["max_loss"]
                line = f"{ch['run']}: {ev} loss {la:.4f} <= {ch['max_loss']:.4f}"
            else:
                lb = loss[ch["reference"]]
                ok = la <= lb + ch["max_loss_gap"] + 1e-12
                line = (f"{ch['run']} ({la:.4f}) within {ch['max_loss_gap']:.3f} nats/char of "
                        f"{ch['reference']} ({lb:.4f}): gap {la - lb:+.4f}")
        elif "min_accuracy" in ch:
            ok = a >= ch["min_accuracy"]
            line = f"{ch['run']}: {100 * a:.2f}% >= {100 * ch['min_accuracy']:.2f}%"
        else:
            b = acc[ch["reference"]]
            ok = a >= b - ch["max_gap"] - 1e-12
            line = (f"{ch['run']} ({100 * a:.2f}%) within {100 * ch['max_gap']:.1f} point(s) "
                    f"of {ch['reference']} ({100 * b:.2f}%): gap {100 * (b - a):+.2f}")
        out.append((ok, f"{'PASS' if ok else 'FAIL'}  {line}"))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``signsgd compare`` from the runs' summaries.

    Example:
        >>> print(format_table([{"name": "a", "optimizer": "sgd", "workers": 1,
        ...     "test_accuracy": 0.5, "test_loss": 1.0, "wall_time_s": 2.0, "cpu_time_s": 3.0,
        ...     "bytes_sent_per_step": 0, "bytes_received_per_step": 0}]).splitlines()[2])
        | a | sgd | 1 | 50.00% | 1.0000 | 2.0 | 3.0 | 0 | 0 |
    """
    if all("val_bpc" in r for r in rows):
        lines = ["| run | optimiser | workers | steps | val loss (nats/char) | bits/char "
                 "| wall time (s) | CPU time (s) | bytes sent / worker / step "
                 "| bytes received / worker / step |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['optimizer']} | {r['workers']} | {r['steps']} | "
                  f"{r['val_loss']:.4f} | {r['val_bpc']:.3f} | {r['wall_time_s']:.1f} | "
                  f"{r.get('cpu_time_s', math.nan):.1f} | {r['bytes_sent_per_step']:,.0f} | "
                  f"{r['bytes_received_per_step']:,.0f} |" for r in rows]
        return "\n".join(lines) + "\n"
    ev = "test" if all("test_accuracy" in r for r in rows) else "val"
    head = (f"| run | optimiser | workers | {ev} accuracy | {ev} loss | wall time (s) "
            "| CPU time (s) | bytes sent / worker / step | bytes received / worker / step |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = r.get(f"{ev}_accuracy", r.get("val_accuracy"))
        loss = r.get(f"{ev}_loss", r.get("val_loss"))
        lines.append(f"| {r['name']} | {r['optimizer']} | {r['workers']} | {100 * acc:.2f}% | "
                     f"{loss:.4f} | {r['wall_time_s']:.1f} | {r.get('cpu_time_s', math.nan):.1f}"
                     f" | {r['bytes_sent_per_step']:,.0f} | {r['bytes_received_per_step']:,.0f} |")
    return "\n".join(lines) + "\n"


def _check_results_out(out: Path, slugs: list[str], overwrite: bool) -> None:
    """Refuse a link where a run's folder or a result would go, and (unless ``overwrite``,
    which removes the earlier results) an ``out`` with an earlier compare's results."""
    links = [n for n in (*slugs, *RESULT_FILES) if (out / n).is_symlink()]
    if links:
        raise OutputError(f"--out {out}: {links[0]} is a symbolic link; compare writes only "
                          "inside --out, never through a link — remove it or give another --out")
    earlier = [n for n in RESULT_FILES if (out / n).exists()] + [
        f"{s}/" for s in slugs if any((out / s / f).exists() for f in RUN_FILES)]
    if earlier and not overwrite:
        raise OutputError(f"--out {out} holds the results of an earlier compare "
                          f"({', '.join(earlier)}); add --overwrite to replace them or give "
                          "another --out")
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)


def compare(configs: list[TrainConfig], out: Path, *, progress: bool = True,
            data_dir: str | None = None, checks: list[dict[str, Any]] | None = None,
            overwrite: bool = False) -> list[dict[str, Any]]:
    """Validate every run (and the data) first, then train them in order; return their
    summaries (see :func:`signsgd.train.train`).

    Run ``NAME`` writes to ``out/SLUG-OF-NAME``; then ``out/table.md`` (with the PASS/FAIL
    lines of ``checks``, from :func:`parse_checks`), ``out/table.json`` and ``out/compare.png``
    are written. ``data_dir`` (if given) overrides every run's. ``out`` is held
    (:func:`signsgd.outputs.lock_run`) until the end.

    Raises:
        ConfigError: a run's bad config (the message names the run) or two runs whose
            folders would be the same.
        OutputError: ``out`` holds an earlier compare's results (unless ``overwrite``), a
            link where a run's folder or a result would go, or is in use by another run.

    Example:
        >>> compare(parse_compare(DEFAULT_COMPARE), Path("runs/demo"))  # doctest: +SKIP
    """
    from signsgd.tasks import ImageClassification, make_task
    from signsgd.train import train

    out, prepared, slugs = Path(out), [], {}
    for c in configs:
        slug = re.sub(r"[^a-z0-9]+", "-", c.name.lower()).strip("-") or "run"
        if slug in slugs:
            raise ConfigError(f"runs {slugs[slug]!r} and {c.name!r} would both write to "
                              f"{out / slug}; give them names that differ in letters or digits")
        slugs[slug] = c.name
        try:
            prepared.append(validate(dataclasses.replace(
                c, out=str(out / slug), progress=progress, overwrite=True,
                data_dir=c.data_dir if data_dir is None else data_dir)))
        except ConfigError as exc:
            raise ConfigError(f"run {c.name!r}: {exc}") from None
    tasks: dict[tuple[str, str | None], Any] = {}
    for c in prepared:  # every dataset found and every size checked before the first run
        key = (c.data, c.data_dir)
        if key not in tasks:
            tasks[key] = make_task(c)
        if isinstance(tasks[key], ImageClassification):
            try:
                validate(c, n_train=len(tasks[key].train_ds) + (c.validation or 0))
            except ConfigError as exc:
                raise ConfigError(f"run {c.name!r}: {exc}") from None
    with lock_run(out):
        _check_results_out(out, list(slugs), overwrite)
        summaries, t0 = [], time.perf_counter()
        for i, c in enumerate(prepared):
            budget = f"{c.steps} steps" if c.steps else f"{c.epochs} epochs"
            print(f"[{i + 1}/{len(prepared)}] {c.name}: {c.optimizer}, {c.workers} worker(s), "
                  f"lr {c.lr}, batch {c.batch_size}/worker, {budget}", flush=True)
            summaries.append(train(c))
        total = time.perf_counter() - t0
        table = format_table(summaries)
        results = evaluate_checks(checks or [], summaries)
        if results:
            table += "\nQuality bar:\n\n" + "".join(f"- {line}\n" for _, line in results)
        write_atomic(out / "table.md", lambda tmp: tmp.write_text(table))
        runs = [{k: v for k, v in s.items() if k != "params"} for s in summaries]
        write_atomic(out / "table.json", lambda tmp: tmp.write_text(json.dumps(
            {"total_wall_time_s": total, "runs": runs}, indent=2, default=str)))
        plot_overlay([(s["name"], read_metrics(Path(s["config"]["out"]) / "metrics.jsonl"))
                      for s in summaries], out / "compare.png")
    return summaries
