"""`make demo`: the whole pipeline on the bundled toy world, offline, on a CPU.

Builds the toy world and its tiny BERT, then checks the data. (The retriever, candidates and
reranker stages are added as those scripts land.)
"""
import argparse
import os
import sys

from data_loader import Zeshel, summary_lines
from toy_world import make_toy_world
from utils import cli_main


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the toy world and the runs")
    args = parser.parse_args(argv)
    data_dir, bert_dir = make_toy_world(os.path.join(args.out, "toy"))
    print(f"toy world in {data_dir}, tiny BERT in {bert_dir}")
    print("\n".join(summary_lines(Zeshel(data_dir, splits=("train", "val", "test")))))
    print("data checks passed; the retriever and reranker stages are not in the demo yet")


if __name__ == "__main__":
    sys.exit(main())
