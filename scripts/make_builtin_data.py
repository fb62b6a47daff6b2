"""Rebuild the data sets shipped in src/loralab/zoo/data/ from ../shared/data, byte for byte.

    python scripts/make_builtin_data.py [SHARED_DATA_DIR]

Fixed seeded subsets, gzipped with mtime 0, so the same input always gives the same files.
"""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "loralab" / "zoo" / "data"

LICENSES = """Data sets shipped with loralab
(small fixed subsets, gzipped; rebuilt by scripts/make_builtin_data.py)

sst2_train.tsv.gz (8,000 rows sampled with seed 0 from GLUE SST-2 train as split by the ALPS repository),
sst2_test.tsv.gz (872 rows: GLUE's SST-2 dev set, the split papers report)
  Stanford Sentiment Treebank, Socher et al. 2013, "Recursive Deep Models for Semantic Compositionality
  Over a Sentiment Treebank", as distributed by GLUE (Wang et al. 2018). The train rows are GLUE's train
  split as divided by the ALPS repository (Yuan et al. 2020). Licence: research use, as distributed by
  GLUE. Format: sentence<TAB>label, labels 0 negative, 1 positive.

agnews_train.tsv.gz (10,000 rows, a sample of the standard AG News train split),
agnews_test.tsv.gz (2,000 rows sampled with seed 0 from the standard 7,600-row test split)
  AG's news corpus, Zhang, Zhao & LeCun 2015, "Character-level Convolutional Networks for Text
  Classification". Licence: non-commercial research use. Format: text<TAB>label, labels World, Sports,
  Business, Sci/Tech.

gsm8k_train.jsonl.gz (2,000 rows sampled with seed 0 from the 7,473-row train split),
gsm8k_test.jsonl.gz (all 1,319 test rows)
  Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems". Licence: MIT (below).
  Format: JSON lines {"question", "answer"}; the final answer follows "#### ".
"""


def lines(path: Path, header: bool = False) -> list[str]:
    rows = path.read_text(encoding="utf-8").splitlines()
    return rows[1:] if header else rows


def sample(rows: list[str], n: int | None = None, seed: int = 0) -> list[str]:
    """A seeded random subset of n rows (all rows, shuffled, when n is None)."""
    return random.Random(seed).sample(rows, len(rows) if n is None else min(n, len(rows)))


def write(name: str, rows: list[str]) -> None:
    with gzip.GzipFile(OUT / name, "wb", mtime=0) as f:
        f.write(("\n".join(rows) + "\n").encode("utf-8"))


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write("sst2_train.tsv.gz", sample(lines(shared / "sst2/train.tsv", header=True), 8000))
    write("sst2_test.tsv.gz", sample(lines(shared / "sst2/test.tsv", header=True)))
    write("agnews_train.tsv.gz", sample(lines(shared / "agnews/dev.tsv")))
    write("agnews_test.tsv.gz", sample(lines(shared / "agnews/test.tsv"), 2000))
    write("gsm8k_train.jsonl.gz", sample(lines(shared / "gsm8k/train.jsonl"), 2000))
    write("gsm8k_test.jsonl.gz", lines(shared / "gsm8k/test.jsonl"))
    licence = (shared / "gsm8k/LICENSE").read_text(encoding="utf-8")
    (OUT / "LICENSES.txt").write_text(LICENSES + "\n\nGSM8K licence text:\n\n" + licence, encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data")
