"""A stand-in Hugging Face hub for rehearsing ``full`` and ``colab`` on a CPU offline: ``build_hub`` writes a hub cache
(blobs, snapshots, refs, the cached tree listing) with every repository they name, under real ids and layouts
(variants, tokenizer files, extras nobody should fetch), small configs, random weights, so the libraries take their
real offline paths. Seams: ``data._offline_snapshot`` (datasets) and open_clip's ``hf-hub:`` name. Writes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = "2"  # bump when a repository below changes: an older stand-in is rebuilt
SDXL_BASE, SDXL_REFINER = "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0"
VAE_FIX = "madebyollin/sdxl-vae-fp16-fix"
LINE = "line-corporation/japanese-large-lm-3.6b"
E5 = "intfloat/multilingual-e5-large"
JP_BASE, JP_REFINER = "tohoku-nlp/stable-diffusion-xl-jp-base-1.0", "tohoku-nlp/stable-diffusion-xl-jp-refiner-1.0"
CLIP = "timm/vit_large_patch14_clip_224.openai"
JPARACRAWL = "Hoshikuzu/JParaCrawl"  # a dataset repo

# files the real repositories carry that from_pretrained never reads: other frameworks, pickles, single-file
# checkpoints. Each is a few bytes here; a loader that fetches or opens one has chosen wrongly.
_EXTRAS = {
    SDXL_BASE: ["sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "01.png", "README.md",
                "sd_xl_offset_example-lora_1.0.safetensors", "unet/diffusion_flax_model.msgpack", "unet/model.onnx",
                "unet/model.onnx_data", "unet/openvino_model.bin", "unet/openvino_model.xml",
                "text_encoder/flax_model.msgpack", "text_encoder/model.onnx", "text_encoder_2/flax_model.msgpack",
                "text_encoder_2/model.onnx", "text_encoder_2/model.onnx_data", "vae/diffusion_flax_model.msgpack",
                "vae_decoder/model.onnx", "vae_encoder/model.onnx"],
    SDXL_REFINER: ["sd_xl_refiner_1.0.safetensors", "sd_xl_refiner_1.0_0.9vae.safetensors", "01.png", "README.md",
                   "unet/model.onnx", "unet/model.onnx_data", "text_encoder_2/model.onnx", "vae_decoder/model.onnx"],
    VAE_FIX: ["diffusion_pytorch_model.bin", "sdxl_vae.safetensors", "sdxl.vae.safetensors", "README.md"],
    LINE: ["pytorch_model.bin", "README.md", "generation_config.json"],
    E5: ["pytorch_model.bin", "onnx/model.onnx", "README.md"],
    JP_BASE: ["README.md", "images/sample_images.png"],
    JP_REFINER: ["README.md", "images/sample_images.png"],
    CLIP: ["open_clip_pytorch_model.bin", "README.md"],
}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(cache: Path, repo_id: str, files: dict[str, bytes | Path], repo_type: str = "model") -> Path:
    """One repository in the hub cache, as ``snapshot_download`` leaves it, with its cached tree listing. ``files``:
    path in the repo -> content (bytes, or a file to copy). Returns the snapshot folder."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    storage = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blobs = {name: (data if isinstance(data, bytes) else Path(data).read_bytes()) for name, data in files.items()}
    listing = json.dumps({name: hashlib.sha256(b).hexdigest() for name, b in sorted(blobs.items())}).encode()
    commit = hashlib.sha1(repo_id.encode() + listing).hexdigest()  # a fixed 40-hex "commit" per content
    entries = {}
    for name, data in blobs.items():
        sha256 = hashlib.sha256(data).hexdigest()
        (storage / "blobs").mkdir(parents=True, exist_ok=True)
        (storage / "blobs" / sha256).write_bytes(data)
        target = storage / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(storage / "blobs" / sha256, target.parent), target)  # as the hub cache does
        lfs = name.endswith((".safetensors", ".bin", ".model", ".parquet", ".onnx", ".onnx_data", ".msgpack"))
        entries[name] = TreeCacheEntry(size=len(data), blob_id=_git_blob_id(data),
                                       lfs_sha256=sha256 if lfs else None, lfs_size=len(data) if lfs else None)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    write_tree_cache(str(storage), commit, entries)
    return storage / "snapshots" / commit


def _folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _with_fp16_variant(files: dict[str, Path], out: Path) -> dict[str, Path | bytes]:
    """``files`` plus, beside each safetensors weights file, its ``.fp16`` variant (the tensors cast to float16)."""
    from safetensors.torch import load_file, save_file

    result: dict[str, Path | bytes] = dict(files)
    for name, path in files.items():
        if name.endswith(".safetensors"):
            half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
            dest = out / name.replace(".safetensors", ".fp16.safetensors")
            dest.parent.mkdir(parents=True, exist_ok=True)
            save_file(half, dest, metadata={"format": "pt"})
            result[dest.relative_to(out).as_posix()] = dest
    return result


def _clip_tokenizer_files(folder: Path, pad: str) -> dict[str, bytes]:
    """SDXL's tokenizer folders as the real repos hold them: vocab.json and merges.txt (no tokenizer.json)."""
    from .core.clip_tokenizer import write_clip_vocab

    vocab, merges = write_clip_vocab(folder)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True}
    return {"vocab.json": vocab.read_bytes(), "merges.txt": merges.read_bytes(),
            "special_tokens_map.json": json.dumps(special).encode(),
            "tokenizer_config.json": json.dumps(config).encode()}


def _sdxl_repos(work: Path) -> dict[str, dict]:
    """The English base and refiner (the zoo's tiny recipe, random weights) in the hub's layout: fp32 files and their
    fp16 variant, the base's older ``vae_1_0/``, the real tokenizer files, and the extras."""
    from .core.zoo import build_recipe

    build_recipe("tiny", work / "zoo")
    repos = {}
    for role, repo in (("base", SDXL_BASE), ("refiner", SDXL_REFINER)):
        folder = work / "zoo" / role
        files = {k: v for k, v in _folder_files(folder).items() if not k.startswith(("tokenizer", "zoo.json"))}
        if role == "base":
            files |= {f"vae_1_0/{k.split('/', 1)[1]}": v for k, v in files.items() if k.startswith("vae/")}
        files = _with_fp16_variant(files, work / f"{role}-fp16")
        for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            if (folder / sub).is_dir():
                files |= {f"{sub}/{k}": v for k, v in _clip_tokenizer_files(work / f"{role}-{sub}", pad).items()}
        repos[repo] = files
    vae = _folder_files(work / "zoo" / "base" / "vae")
    config = json.loads(vae["config.json"].read_text()) | {"force_upcast": False}  # the fix needs no fp32 upcast
    repos[VAE_FIX] = {"config.json": json.dumps(config).encode(),
                      "diffusion_pytorch_model.safetensors": vae["diffusion_pytorch_model.safetensors"]}
    return repos


def _japanese_sentences(n: int) -> list[tuple[str, str]]:
    from .data import load_tatoeba

    pairs, _ = load_tatoeba()
    return pairs[:n]


def _line_repo(work: Path, pairs) -> dict:
    """LINE's tokenizer files: a sentencepiece model with LINE's special ids (unk 0, <s> 1, </s> 2, <pad> 3) and
    its normalisation rule (nmt_nfkc), T5-style configs; the 3.6B model's weights are not needed (extras)."""
    import sentencepiece as spm

    prefix = work / "line" / "spiece"
    prefix.parent.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter([ja for ja, _ in pairs]), model_prefix=str(prefix),
                                   vocab_size=4000, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   byte_fallback=True, minloglevel=2, num_threads=2, seed_sentencepiece_size=100_000)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return {"spiece.model": prefix.with_suffix(".model"), "special_tokens_map.json": json.dumps(special).encode(),
            "tokenizer_config.json": json.dumps({**special, "tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                 "model_max_length": 2048, "keep_accents": True}).encode(),
            "config.json": json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
                                       "vocab_size": _pieces(prefix.with_suffix(".model"))}).encode()}


def _pieces(model_file: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()


def _e5_repo(work: Path, pairs) -> dict:
    """multilingual-e5-large's sentence-transformers layout (modules.json, 1_Pooling/, an XLM-R model and its
    sentencepiece tokenizer), at a width of 32: a random embedder that stage 2 reads exactly as the real one."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from .tokenization import sentencepiece_to_fast, train_sentencepiece

    model_file = train_sentencepiece([t for pair in pairs for t in pair], work / "e5" / "sentencepiece.bpe.model",
                                     vocab_size=3000)
    tok = sentencepiece_to_fast(model_file)
    hf = work / "e5" / "hf"
    tok.save_pretrained(hf)
    config = json.loads((hf / "tokenizer_config.json").read_text()) | {"tokenizer_class": "XLMRobertaTokenizer"}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(hf)
    st = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=512),
                                      models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(str(work / "e5" / "st"))
    files = _folder_files(work / "e5" / "st")
    files["sentencepiece.bpe.model"] = model_file
    return files


def _published_repos(work: Path, line: dict) -> dict[str, dict]:
    """SD-XL 1.0-jp's two repositories as the card publishes them: plain (non-variant) weights only, and the Japanese
    tokenizers as T5-style configs over LINE's spiece.model. Random Japanese text encoders over the English UNets."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    zoo = work / "zoo"
    repos = {}
    for role, repo in (("base", JP_BASE), ("refiner", JP_REFINER)):
        folder = zoo / role
        index = json.loads((folder / "model_index.json").read_text())
        files = {k: v for k, v in _folder_files(folder).items()
                 if k.split("/")[0] in ("unet", "vae", "scheduler")}
        for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if index.get(sub, [None])[0] is None:
                continue
            config = cls.config_class.from_pretrained(folder / sub)
            config.vocab_size = _pieces(line["spiece.model"])  # a row per piece of LINE's tokenizer, as the card's
            torch.manual_seed(1)
            cls(config).save_pretrained(work / f"jp-{role}" / sub)
            files |= _folder_files(work / f"jp-{role}" / sub, f"{sub}/")
            tok = sub.replace("text_encoder", "tokenizer")
            index[tok] = ["transformers", "T5Tokenizer"]
            files |= {f"{tok}/{k}": v for k, v in line.items() if k not in ("config.json", "tokenizer_config.json")}
            config = json.loads(line["tokenizer_config.json"]) | {"model_max_length": 77}  # saved with the pipeline
            files[f"{tok}/tokenizer_config.json"] = json.dumps(config).encode()
        files["model_index.json"] = json.dumps(index, indent=2).encode()
        repos[repo] = files
    return repos


def _clip_repo(work: Path) -> dict:
    """An open_clip ``hf-hub:`` repository (open_clip_config.json + open_clip_model.safetensors), the layout of
    timm/vit_large_patch14_clip_224.openai, with a tiny ViT: what the CLIP score loads by that id."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                         "std": [0.26862954, 0.26130258, 0.27577711]}}
    torch.manual_seed(2)
    model = open_clip.model.CLIP(**{k: v for k, v in model_cfg.items()})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "clip.safetensors")
    return {"open_clip_config.json": json.dumps(config).encode(),
            "open_clip_model.safetensors": work / "clip.safetensors"}


def _jparacrawl_repo(work: Path, pairs) -> dict:
    """JParaCrawl's dataset layout: parquet files of ``translation: {en, ja}`` records (Tatoeba pairs as content)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"translation": [{"en": en, "ja": ja} for ja, en in pairs]})
    half = len(pairs) // 2
    files = {}
    for n, part in enumerate((table.slice(0, half), table.slice(half))):
        path = work / f"train-{n:05d}-of-00002.parquet"
        pq.write_table(part, path)
        files[f"data/{path.name}"] = path
    return files | {"README.md": b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                 b"    path: data/train-*\n---\n# stand-in of Hoshikuzu/JParaCrawl\n"}


def build_hub(cache: str | Path, pairs: int = 20_000) -> Path:
    """The stand-in hub in ``cache`` (a hub cache folder: point ``HF_HUB_CACHE`` at it), built once; a stand-in of
    another ``VERSION`` is replaced. Returns ``cache``."""
    from .core.runs import atomic_path

    cache = Path(cache).expanduser().resolve()
    stamp = cache / "jpsdxl-standin.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION:
        return cache
    if cache.exists():
        if not stamp.exists():
            raise FileExistsError(f"{cache} exists and is not a stand-in hub written by jpsdxl: give an empty or new "
                                  f"folder (the stand-in never goes into a real Hugging Face cache)")
        shutil.rmtree(cache)
    with atomic_path(cache) as out, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sample = _japanese_sentences(pairs)
        repos = _sdxl_repos(work)
        line = _line_repo(work, sample)
        repos |= {LINE: line, E5: _e5_repo(work, sample), CLIP: _clip_repo(work)} | _published_repos(work, line)
        for repo, files in repos.items():
            extras = {name: f"stand-in for {repo}/{name}: never read\n".encode() for name in _EXTRAS.get(repo, [])}
            write_repo(out, repo, files | extras)
        write_repo(out, JPARACRAWL, _jparacrawl_repo(work, sample), repo_type="dataset")
        (out / "jpsdxl-standin.json").write_text(json.dumps({"version": VERSION, "repos": sorted(repos) + [JPARACRAWL],
                                                             "pairs": len(sample)}, indent=1))
    return cache
