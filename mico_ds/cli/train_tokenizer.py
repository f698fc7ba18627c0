"""Train a Llama-2-style SentencePiece BPE tokenizer (tokenizer.model) on captions.

    python tools/train_tokenizer.py --captions-from data/mycorpus --out data/mycorpus/tokenizer
    python tools/train_tokenizer.py --captions-from 'shards/corpus-{000000..000009}.tar' \\
        --captions-from extra_captions.txt --out tok --vocab-size 8000

--captions-from takes a .txt file (one caption per line), a .tar shard, a directory of shards or a
brace pattern; from shards it reads every caption of the json members and every txt member. The
model has unk=0 <unk>, bos=1 <s>, eos=2 </s>, no pad piece and byte fallback, like Llama-2's; load it
with mico_ds.data.tokenizer.Tokenizer.from_path, which adds <pad> and <mask>.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from mico_ds.cli.common import fail
from mico_ds.data.tokenizer import Tokenizer, captions_from, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--captions-from", action="append", required=True, help="txt, shard, dir or pattern (repeat)"
    )
    p.add_argument("--out", required=True, help="output directory for tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=512, help="vocabulary size (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="SentencePiece seed (%(default)s)")
    p.add_argument("--max-sentences", type=int, default=10_000_000, help="captions sampled (%(default)s)")
    a = p.parse_args(argv)
    try:
        captions = list(itertools.chain.from_iterable(captions_from(s) for s in a.captions_from))
        path = train_sentencepiece(captions, a.out, a.vocab_size, a.seed, max_sentences=a.max_sentences)
        tok = Tokenizer.from_path(path)
    except ValueError as e:
        return fail("train_tokenizer", e)
    sp = tok.special
    print(
        f"{path}: trained on {len(captions)} captions; "
        f"{sp.vocab_size} ids with <pad>={sp.pad_id} <mask>={sp.mask_id}"
    )
    example = captions[0]
    ids, _ = tok.encode([example], max_len=64)
    print(f"example: {example!r} -> {ids[0].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
