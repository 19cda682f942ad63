"""`python -m rporec_jax.data prepare|stats ...`: prepare a dataset directory and print its statistics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rporec_jax.data.interactions import DUPLICATES
from rporec_jax.data.prompts import PromptConfig
from rporec_jax.data.sources import SOURCES
from rporec_jax.data.splits import SplitConfig
from rporec_jax.data.rows import DataError
from rporec_jax.data.storage import MANIFEST, DataConfig, open_dataset, prepare_dataset


def _source_from_args(args) -> object:
    kw = {"skip_bad_rows": args.skip_bad_rows} if args.source != "synthetic" else {}
    if args.source == "amazon2023":
        kw.update(root=args.root, category=args.category, min_items=args.min_items)
    elif args.source == "lcrec":
        kw.update(root=args.root, prefix=args.prefix)
    elif args.source == "movielens":
        kw.update(root=args.root, variant=args.variant)
    else:
        kw.update(seed=args.seed, num_users=args.num_users)
    if args.source in ("amazon2023", "movielens"):
        kw["duplicates"] = args.duplicates
        if args.no_download:
            kw["download"] = False
    if args.source != "synthetic" and not args.root:
        raise SystemExit(f"--root is required for source {args.source}")
    return SOURCES[args.source](**kw)


def format_stats(manifest: dict) -> str:
    """Returns a human-readable statistics report of a prepared dataset's manifest."""
    s = manifest["stats"]
    lines = [f"dataset     {manifest['name']}  ({manifest['config']['split']['kind']} split)",
             f"users       {s['users']}", f"items       {s['items']}", f"interactions {s['interactions']}",
             f"seq length  {json.dumps(s['seq_len'])}",
             f"users with a single interaction (no instance): {s.get('users_without_instances', '?')}"]
    for split, v in s["splits"].items():
        lines.append(f"{split:<6} instances {v['instances']:>8}   history length {json.dumps(v['history_len'])}")
    if manifest.get("prompt_tokens"):
        for split, v in manifest["prompt_tokens"].items():
            t = manifest["truncation"][split]
            lines.append(f"{split:<6} prompt tokens {json.dumps(v)}   truncated {t['prompts_truncated']} "
                         f"(dropped {t['history_items_dropped']} history items)")
    rows = manifest["rows"]
    lines.append(f"bad rows skipped {rows['bad_rows']}; filters {json.dumps(rows['filters'])}")
    if rows.get("duplicate_rows"):
        action = manifest["config"]["source"].get("duplicates", "keep")
        lines.append(f"duplicate interaction rows {rows['duplicate_rows']} ({action}, see the source's `duplicates`)")
    for e in rows["bad_row_examples"][:5]:
        lines.append(f"  e.g. {e}")
    return "\n".join(lines)


def prepare_hint(folder: str) -> str:
    """Returns the `prepare` command for the raw source files in `folder`, guessed from the file names."""
    p = Path(folder)
    if (p / "u.data").exists() or (p / "u.item").exists():
        args = "--source movielens"
    elif (p / "ratings.dat").exists():
        args = "--source movielens --variant 1m"
    elif inter := sorted(p.glob("*.inter.json")):
        prefix = f" --prefix {inter[0].name[: -len('.inter.json')]}" if len(inter) > 1 else ""
        args = f"--source lcrec{prefix} --split leave_one_out"
    elif reviews := [r for r in sorted(p.glob("*.csv.gz")) if (p / f"meta_{r.name[:-7]}.jsonl.gz").exists()]:
        args = f"--source amazon2023 --category {reviews[0].name[:-7]}"
    else:
        args = "--source {movielens,lcrec,amazon2023}"
    return f"python -m rporec_jax.data prepare {args} --root {folder}"


def main(argv: list[str] | None = None) -> int:
    """Returns the process exit code after running the `prepare` or `stats` command."""
    p = argparse.ArgumentParser(prog="python -m rporec_jax.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="prepare (or reuse) a dataset directory and print its statistics")
    prep.add_argument("--source", choices=sorted(SOURCES), default="synthetic")
    prep.add_argument("--root", default="", help="directory with the source files")
    prep.add_argument("--category", default="Musical_Instruments", help="Amazon 2023 category")
    prep.add_argument("--min-items", type=int, default=10_000, help="Amazon 2023: widen the window until this many")
    prep.add_argument("--prefix", default="", help="LC-Rec file prefix (auto-detected when unique)")
    prep.add_argument("--variant", default="100k", choices=["100k", "1m"], help="MovieLens variant")
    prep.add_argument("--num-users", type=int, default=200, help="synthetic users")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--no-download", action="store_true")
    prep.add_argument("--skip-bad-rows", action="store_true", help="count and report malformed rows, do not fail")
    prep.add_argument("--duplicates", choices=DUPLICATES, default="drop",
                      help="MovieLens/Amazon 2023: drop or keep rows repeating a (user, item, time); counted "
                           "either way")
    prep.add_argument("--split", default="temporal", choices=["temporal", "leave_one_out"])
    prep.add_argument("--window", type=int, default=20)
    prep.add_argument("--tokenizer", default="", help="HF dir or .gguf whose chat template renders prompts")
    prep.add_argument("--max-prompt-tokens", type=int, default=1024)
    prep.add_argument("--num-negatives", type=int, default=49)
    prep.add_argument("--out", default=None, help="datasets root (default $RPOREC_DATASETS_DIR or the cache)")
    st = sub.add_parser("stats", help="print the statistics of a prepared dataset directory")
    st.add_argument("dataset")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.cmd == "prepare":
        cfg = DataConfig(
            source=_source_from_args(args), split=SplitConfig(kind=args.split, window=args.window),
            prompt=PromptConfig(max_prompt_tokens=args.max_prompt_tokens), tokenizer=args.tokenizer,
            num_negatives=args.num_negatives, seed=args.seed,
        )
        path = prepare_dataset(cfg, args.out, log=lambda m: print(m, file=sys.stderr))
        print(path)
    else:
        path = args.dataset
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path} does not exist; `stats` reads a dataset directory that `prepare` wrote")
        if not (Path(path) / MANIFEST).exists():
            print(f"error: {path} is not a prepared dataset (it has no {MANIFEST}); `stats` reads what `prepare` "
                  f"writes. Prepare it first, then run `stats` on the directory that prepare prints:\n  "
                  f"{prepare_hint(path)}", file=sys.stderr)
            return 1
    print(format_stats(open_dataset(path).manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
