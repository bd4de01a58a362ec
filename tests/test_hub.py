import pytest

from jpsdxl.core.hub import ModelNotAvailable
from jpsdxl.core.models import resolve
from jpsdxl.core.profiles import load_profile


def test_offline_full_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants  # an empty cache, whatever this machine holds

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from jpsdxl.core.models import resolve_profile

    import socket

    def no_network(*args, **kwargs):  # "fast" means no connection attempted (a timing would depend on the machine)
        raise AssertionError("a connection was attempted with HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelNotAvailable) as err:
        resolve_profile(load_profile("full"))
    message = str(err.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "SDXL base" in message
    assert "stabilityai/stable-diffusion-xl-refiner-1.0" in message and "madebyollin/sdxl-vae-fp16-fix" in message
    assert "Japanese tokenizer 'line-corporation/japanese-large-lm-3.6b'" in message  # every model, one message
    assert "embedder 'intfloat/multilingual-e5-large'" in message
    assert "HF_HUB_OFFLINE" in message and "--profile tiny" in message
    assert err.value.__cause__ is None  # no chained stack trace from huggingface_hub


def test_local_folder_passes_through(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve(str(tmp_path)) == tmp_path


def test_nonsense_spec():
    with pytest.raises(ModelNotAvailable, match="no such folder"):
        resolve("./not/here")


def test_offline_hub_tokenizer_names_itself(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from jpsdxl.tokenization import japanese_tokenizers

    with pytest.raises(ModelNotAvailable, match="Japanese tokenizer 'line-corporation/japanese-large-lm-3.6b'"):
        japanese_tokenizers(load_profile("full"), japanese_texts=["猫"])


def test_full_random_on_a_machine_without_cuda_stops_before_building(monkeypatch):
    import torch

    from jpsdxl.core import zoo
    from jpsdxl.generation import load_pipelines
    from jpsdxl.core.profiles import ProfileError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(zoo, "build_recipe", lambda *a: pytest.fail("started building 5.7 B parameters"))
    with pytest.raises(ProfileError, match="no CUDA GPU.*--profile tiny"):
        load_pipelines(load_profile("full-random"))


# Files SDXL's real hub repos carry besides what from_pretrained(variant="fp16") reads: other frameworks, fp32 and
# pickled copies, single-file checkpoints. A plain snapshot_download would fetch all of them. (Not listed: the base
# repo's vae_1_0/ folder, an older VAE: diffusers 0.42's own selection keeps weights of any sub-folder, so it would
# fetch that one too. We use diffusers' selection as it is rather than re-implement it.)
SKIPPED = ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin", "unet/flax_model.msgpack",
           "unet/openvino_model.xml", "unet/openvino_model.bin", "unet/model.onnx", "unet/model.onnx_data",
           "text_encoder/flax_model.msgpack", "text_encoder/pytorch_model.bin", "text_encoder/model.onnx",
           "vae_decoder/model.onnx", "sd_xl_base_1.0.safetensors",
           "sd_xl_offset_example-lora_1.0.safetensors", "01.png"]


@pytest.fixture
def local_hub(tmp_path, monkeypatch, tiny):
    """A hub repository laid out on disk, served through diffusers' own download code: only the transport (repo
    listing, single-file and snapshot downloads) reads the local folder instead of the network; every decision of
    what to fetch is diffusers'. Returns (repo folder, list of fetched files)."""
    import shutil
    from types import SimpleNamespace

    from diffusers.pipelines import pipeline_utils
    from huggingface_hub.utils import filter_repo_objects

    repo = tmp_path / "repo"
    shutil.copytree(resolve(tiny.models.base), repo)
    for weights in list(repo.rglob("*.safetensors")):  # what the hub has: fp32 weights and their fp16 variant
        shutil.copy(weights, weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    for name in SKIPPED:
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_bytes(b"x" * 1000)
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    fetched, out = [], tmp_path / "snapshot"

    def fetch(name):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, out / name)
        fetched.append(name)
        return str(out / name)

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kw):
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            fetch(name)
        return str(out)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda *a, revision=None, **k: revision)
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *a, **k: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in files]))
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda repo_id, filename, **k: fetch(filename))
    monkeypatch.setattr(pipeline_utils, "snapshot_download", snapshot_download)
    return repo, fetched


def test_pipeline_download_fetches_only_what_from_pretrained_reads(local_hub):
    from diffusers import StableDiffusionXLPipeline

    repo, fetched = local_hub
    folder = resolve("someone/tiny-sdxl", "SDXL base", kind="pipeline", variant="fp16")
    assert not set(fetched) & set(SKIPPED)
    weights = sorted(f for f in fetched if f.endswith(".safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "tokenizer_2/tokenizer_config.json"} <= set(fetched)
    StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16")  # and it is enough to load the pipeline


def test_single_model_and_tokenizer_fetch_lists():
    from fnmatch import fnmatch

    from jpsdxl.core.hub import TOKENIZER_FILES, model_files

    vae_repo = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "sdxl_vae.safetensors", "sdxl.vae.safetensors", "images/example.png"]
    pick = lambda names, patterns: [n for n in names if any(fnmatch(n, p) for p in patterns)]  # noqa: E731
    assert pick(vae_repo, model_files()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    line_repo = ["config.json", "pytorch_model.bin", "spiece.model", "tokenizer_config.json", "README.md"]
    assert pick(line_repo, TOKENIZER_FILES) == ["spiece.model", "tokenizer_config.json"]


def test_a_profile_pipeline_folder_must_be_a_pipeline(tmp_path):
    """An existing folder that is not a pipeline (a typo one level up): one line, not 'Repo id must be...'."""
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotAvailable, match="SDXL base .*not a diffusers pipeline folder"):
        resolve(str(tmp_path), "SDXL base", kind="pipeline")
    assert resolve(str(tmp_path), "VAE", kind="model") == tmp_path  # a single model: its own check when loaded
