"""Benchmark: how fast the tokenizers are that jpsdxl builds, relative to the libraries they must match.

Prints measured ratios (ours / reference; below 1.0 means ours is faster), ids only (no padding), one batch:
  * Japanese fast tokenizer (tokenizers Unigram)  vs  sentencepiece itself, on held-out Tatoeba sentences
  * SDXL's CLIP tokenizer rebuilt from open_clip's BPE (transformers)  vs  open_clip's SimpleTokenizer

Usage:  python benchmarks/tokenizers_speed.py [--profile tiny] [--repeat 3]
Not a test: timings vary by machine; the tests check correctness, this prints speed.
"""

import argparse
import time


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import sentencepiece as spm
    from open_clip.tokenizer import SimpleTokenizer

    from jpsdxl import data, tokenization
    from jpsdxl.core.profiles import load_profile

    profile = load_profile(args.profile)
    splits = data.load_pairs(profile)
    ja = [j for j, _ in splits.test]
    en = [e for _, e in splits.test]
    model, _ = tokenization.sentencepiece_model(profile, [j for j, _ in splits.train])
    ja_tok, _ = tokenization.japanese_tokenizers(profile, [j for j, _ in splits.train])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    clip_tok, _ = tokenization.sdxl_tokenizers(profile)
    oc = SimpleTokenizer()

    rows = [
        ("Japanese: fast tokenizer / sentencepiece", len(ja),
         best_of(lambda: ja_tok(ja, add_special_tokens=False)["input_ids"], args.repeat),
         best_of(lambda: sp.encode(ja), args.repeat)),
        ("CLIP: transformers / open_clip", len(en),
         best_of(lambda: clip_tok(en, add_special_tokens=False)["input_ids"], args.repeat),
         best_of(lambda: [oc.encode(t) for t in en], args.repeat)),
    ]
    print(f"{'comparison':45s} {'texts':>6s} {'ours s':>8s} {'ref s':>8s} {'ratio':>6s}")
    for name, n, ours, ref in rows:
        print(f"{name:45s} {n:6d} {ours:8.3f} {ref:8.3f} {ours / ref:6.2f}")


if __name__ == "__main__":
    main()
