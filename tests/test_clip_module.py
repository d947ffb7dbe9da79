"""CLIPModule: configs through open_clip's registry, tokenizer offline, pixel normalisation, logit-scale clamp,
tiny fits through Lightning (dict batches and the shared DataModule), cached-only pretrained weights, and the
exported frozen encoders (reload exactly; pooled == encode_text)."""

from __future__ import annotations

import io
import math
import pickle
import time
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from lightning_diffusion.clip import CLIPImageEncoder, CLIPModule, CLIPTextEncoder
from lightning_diffusion.clip.towers import build_clip_model
from lightning_diffusion.errors import UserError

CAPTIONS = [f"a {style} emoji of {thing}" for style in ("flat", "3D rendered")
            for thing in ("koala", "cat", "rocket", "tree", "heart", "moon", "sun", "apple")]


def dict_batches(n: int = 16, batch_size: int = 8, size: int = 32, seed: int = 0) -> DataLoader:
    """Batches in the DataModule's format (docs/conventions.md), without `tokens` (the module tokenizes)."""
    g = torch.Generator().manual_seed(seed)
    # 4x4 blocks of random colours: distinct, learnable images (uniform noise makes a fresh ViT's features collapse)
    images = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="nearest")
    samples = [(images[i], CAPTIONS[i % len(CAPTIONS)], f"k{i}") for i in range(n)]

    def collate(items):
        return {"image": torch.stack([i for i, _, _ in items]), "caption": [c for _, c, _ in items],
                "key": [k for _, _, k in items]}

    return DataLoader(samples, batch_size=batch_size, collate_fn=collate)


def repeated(batch: dict, times: int) -> DataLoader:
    """A loader yielding the same ready-made dict batch `times` times."""
    return DataLoader([batch] * times, batch_size=None)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                   num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A few steps of each loss (and of the ResNet config) on dict batches, saved as Lightning checkpoints."""
    out = {}
    for name, kwargs in {"clip": {}, "siglip": {"loss": "siglip"}, "rn": {"model_name": "ld-tiny-rn"}}.items():
        root = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        module = CLIPModule(warmup_steps=1, lr=1e-3, **kwargs)
        fit = trainer(root, max_steps=3, limit_val_batches=1)
        fit.fit(module, dict_batches(), dict_batches(seed=1))
        out[name] = root / "clip.ckpt"
        fit.save_checkpoint(out[name])
    return out


def test_project_configs_are_open_clip_models() -> None:
    CLIPModule(model_name="ld-tiny-rn")  # registers the project configs
    assert {"ld-tiny-vit", "ld-tiny-rn"} <= set(open_clip.list_models())
    model = open_clip.create_model("ld-tiny-vit")
    params = sum(p.numel() for p in model.parameters())
    assert 1e6 < params < 1e7


def test_unknown_model_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model_name 'ViT-Tiny-Nope'"):
        CLIPModule(model_name="ViT-Tiny-Nope")


def test_tokenizer_works_offline_and_pickles() -> None:
    module = CLIPModule()
    tokens = module.tokenizer(["a flat emoji of koala", "a cat"])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 32)
    sot, eot = module.tokenizer.sot_token_id, module.tokenizer.eot_token_id
    assert (tokens[:, 0] == sot).all() and (tokens.argmax(dim=-1) == (tokens == eot).int().argmax(dim=-1)).all()
    clone = pickle.loads(pickle.dumps(module.tokenizer))
    assert torch.equal(clone(["a cat"]), tokens[1:])


def test_images_are_mapped_from_minus_one_one_to_the_model_normalisation() -> None:
    module = CLIPModule()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(module.normalize_images(images), ((images + 1) / 2 - mean) / std)
    assert module.normalize_images(torch.zeros(1, 3, 48, 40)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_logit_init_follows_open_clip(loss: str) -> None:
    model = CLIPModule(loss=loss).model
    if loss == "clip":
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and model.logit_bias is None
    else:
        assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10


def test_logit_scale_is_clamped_after_each_step(tmp_path) -> None:
    module = CLIPModule(warmup_steps=1)
    with torch.no_grad():
        module.model.logit_scale.fill_(math.log(100) + 0.5)  # an optimiser step of lr 1e-3 cannot undo this
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, dict_batches(8))
    assert module.model.logit_scale.item() == pytest.approx(math.log(100))


def test_fit_memorises_a_batch_and_logs_retrieval(tmp_path) -> None:
    torch.manual_seed(0)
    module = CLIPModule(warmup_steps=3, lr=5e-4, weight_decay=0.0)
    batch = next(iter(dict_batches(8, 8)))
    with torch.no_grad():
        before = module.loss_fn(*module(batch["image"], module.batch_tokens(batch)), module.logit_scale()).item()
    fit = trainer(tmp_path, max_steps=16, limit_val_batches=1, val_check_interval=16)
    fit.fit(module, repeated(batch, 16), repeated(batch, 1))
    metrics = fit.callback_metrics
    assert before > 2.0 and metrics["train/loss"].item() < 0.5  # log(8) = 2.08 at chance; measured 0.04 here
    assert metrics["val/i2t_recall@1"].item() == 1.0 and metrics["val/t2i_recall@1"].item() == 1.0
    assert metrics["val/cosine_matched"].item() > metrics["val/cosine_unmatched"].item()
    assert metrics["val/samples"].item() == 8
    for key in ("val/t2i_recall@5", "val/logit_scale", "val/loss"):
        assert torch.isfinite(metrics[key])


def test_a_nan_loss_stops_training(tmp_path) -> None:
    module = CLIPModule()
    batch = next(iter(dict_batches(8)))
    batch["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite CLIP loss at step 0"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, repeated(batch, 1))


@pytest.mark.parametrize("variant", ["clip", "siglip", "rn"])
def test_exported_encoders_reload_exactly_and_frozen(trained, variant: str) -> None:
    path = trained[variant]
    module = CLIPModule.load_from_checkpoint(path, weights_only=True).eval().requires_grad_(False)
    text, image = CLIPTextEncoder.from_checkpoint(path), CLIPImageEncoder.from_checkpoint(path)
    for encoder in (text, image):
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    tokens = text.tokenizer(CAPTIONS[:4])
    states, pooled = text(tokens)
    assert states.shape == (4, text.context_length, text.width) and pooled.shape == (4, text.pooled_dim)
    assert (text.context_length, text.width, text.pooled_dim) == (32, 128, 128)
    torch.testing.assert_close(pooled, module.model.encode_text(tokens), rtol=0, atol=1e-6)
    again_states, again_pooled = CLIPTextEncoder.load_frozen(path)(tokens)
    assert torch.equal(again_states, states) and torch.equal(again_pooled, pooled)

    images = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(image(images), module(images, tokens)[0], rtol=0, atol=1e-6)
    assert torch.equal(CLIPImageEncoder.from_checkpoint(path)(images), image(images))
    assert image(torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, image.embed_dim)  # any size is resized
    assert text.token_mask(tokens).sum(1).tolist() == [int(t.argmax()) + 1 for t in tokens]


def test_per_token_states_are_open_clips_final_layer_norm_states(trained) -> None:
    text = CLIPTextEncoder.from_checkpoint(trained["clip"])
    module = CLIPModule.load_from_checkpoint(trained["clip"], weights_only=True).eval().requires_grad_(False)
    tokens = text.tokenizer(CAPTIONS[:3])
    states, pooled = text(tokens)
    # open_clip's own view of the same thing: the last block's output through ln_final.
    reference = module.model.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True)
    torch.testing.assert_close(states, reference["text_intermediates"][-1], rtol=0, atol=1e-5)
    eot_states = states[torch.arange(3), tokens.argmax(dim=-1)]
    torch.testing.assert_close(eot_states @ text.text_projection, pooled)


def test_encoders_refuse_other_checkpoints(tmp_path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="is not a CLIP checkpoint"):
        CLIPTextEncoder.from_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="does not exist"):
        CLIPImageEncoder.from_checkpoint(tmp_path / "missing.ckpt")


def test_uncached_pretrained_tag_fails_fast_with_the_missing_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"ViT-B-32 pretrained='openai' are not cached.*vit_base_patch32_clip_224"):
        build_clip_model("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    with pytest.raises(UserError, match="neither a file nor an open_clip tag"):
        build_clip_model("ld-tiny-vit", pretrained="no-such-tag")


def test_cached_pretrained_tag_is_loaded_from_the_hf_cache(tmp_path, monkeypatch) -> None:
    """A tag whose weights sit in the Hugging Face cache loads without the network, with the tag's mean/std."""
    from safetensors.torch import save_file

    source = open_clip.create_model("ld-tiny-vit")
    repo = tmp_path / "models--test--ld-tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(source.state_dict(), repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors")
    tag = {"hf_hub": "test/ld-tiny-vit/", "url": "", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "t" else {})
    model = build_clip_model("ld-tiny-vit", pretrained="t", cache_dir=str(tmp_path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert tuple(model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)


def test_pretrained_weights_file_is_loaded(tmp_path) -> None:
    source = open_clip.create_model("ld-tiny-vit")
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    module = CLIPModule(pretrained=str(tmp_path / "weights.pt"))
    for key, value in source.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key


# ---------------------------------------------------------------- through the shared DataModule

def _png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder: Path, prefix: str, shards: int, per_shard: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                n = shard * per_shard + index
                writer.write({"__key__": f"{prefix}{n:04d}", "png": _png(n), "txt": CAPTIONS[n % len(CAPTIONS)]})


def test_fit_through_the_shard_datamodule_uses_its_tokens(tmp_path) -> None:
    from data_pipelines import ShardDataModule

    _write_shards(tmp_path / "data", "train", shards=2, per_shard=8)
    _write_shards(tmp_path / "data", "val", shards=1, per_shard=8)
    seen: list[bool] = []

    class Recording(CLIPModule):
        def training_step(self, batch, batch_idx):
            seen.append("tokens" in batch and torch.equal(batch["tokens"], self.tokenizer(batch["caption"])))
            return super().training_step(batch, batch_idx)

    data = ShardDataModule(str(tmp_path / "data/train-*.tar"), str(tmp_path / "data/val-*.tar"), image_size=32,
                           batch_size=4, num_workers=0, shuffle_buffer=0)
    fit = trainer(tmp_path, max_steps=2, val_check_interval=2)
    fit.fit(Recording(warmup_steps=1), datamodule=data)
    assert seen == [True, True]
    assert fit.callback_metrics["val/samples"].item() == 8


def test_reloading_an_architecture_does_not_log_random_initialisation(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        build_clip_model("ld-tiny-vit")  # from scratch: open_clip's notice is true here and stays
    assert any("initialized randomly" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_clip_model("ld-tiny-vit", load_tower_weights=False)  # a checkpoint's weights follow
    assert not any("initialized randomly" in record.getMessage() for record in caplog.records)
