"""Rebuild the data sets shipped in src/loralab/zoo/data/ from ../shared/data (deterministic)."""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
OUT = ROOT / "src" / "loralab" / "zoo" / "data"


def tsv_rows(path: Path, header: bool) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[1:] if header else lines


def sample(rows: list, n: int | None = None, seed: int = 0) -> list:
    """A seeded random subset of n rows (all rows, shuffled, when n is None)."""
    return random.Random(seed).sample(rows, len(rows) if n is None else min(n, len(rows)))


def write(name: str, lines: list[str]) -> None:
    with gzip.GzipFile(OUT / name, "wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write("sst2_train.tsv.gz", sample(tsv_rows(SHARED / "sst2/train.tsv", True), 8000))
    write("sst2_test.tsv.gz", sample(tsv_rows(SHARED / "sst2/test.tsv", True)))
    write("agnews_train.tsv.gz", sample(tsv_rows(SHARED / "agnews/dev.tsv", False)))
    write("agnews_test.tsv.gz", sample(tsv_rows(SHARED / "agnews/test.tsv", False), 2000))
    gsm_train = (SHARED / "gsm8k/train.jsonl").read_text().splitlines()
    write("gsm8k_train.jsonl.gz", sample(gsm_train, 2000))
    gsm_test = (SHARED / "gsm8k/test.jsonl").read_text().splitlines()
    write("gsm8k_test.jsonl.gz", gsm_test)
    licence = (SHARED / "gsm8k/LICENSE").read_text()
    (OUT / "LICENSES.txt").write_text(LICENSES + "\n\nGSM8K licence text:\n\n" + licence)


LICENSES = """Data sets shipped with loralab (small fixed subsets, gzipped; rebuilt by scripts/make_builtin_data.py)

sst2_train.tsv.gz (8,000 rows sampled with seed 0 from GLUE SST-2 train as split by the ALPS repository),
sst2_test.tsv.gz (872 rows: GLUE's SST-2 dev set, the split papers report)
  Stanford Sentiment Treebank, Socher et al. 2013, "Recursive Deep Models for Semantic Compositionality
  Over a Sentiment Treebank", as distributed by GLUE (Wang et al. 2018). Licence: research use, as
  distributed by GLUE. Labels: 0 negative, 1 positive.

agnews_train.tsv.gz (10,000 rows, a sample of the standard AG News train split),
agnews_test.tsv.gz (2,000 rows sampled with seed 0 from the standard 7,600-row test split)
  AG's news corpus, Zhang, Zhao & LeCun 2015, "Character-level Convolutional Networks for Text
  Classification". Licence: non-commercial research use. Labels: World, Sports, Business, Sci/Tech.

gsm8k_train.jsonl.gz (2,000 rows sampled with seed 0 from the 7,473-row train split),
gsm8k_test.jsonl.gz (all 1,319 test rows)
  Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems". Licence: MIT (below).
"""

if __name__ == "__main__":
    main()
