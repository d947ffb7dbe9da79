"""Offline pretrained starts through open_clip's own towers: all-MiniLM-L6-v2 (HF text tower) and
EfficientNet-Lite0 (timm image tower); the standalone frozen MiniLM encoder against sentence-transformers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_diffusion.clip import CLIPModule, CLIPTextEncoder, MiniLMTextEncoder
from lightning_diffusion.clip.towers import minilm_dir
from lightning_diffusion.errors import UserError

SENTENCES = ["a 3D rendered emoji of koala", "a flat vector emoji of a red heart", "rocket"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder.load_frozen()


def test_minilm_encoder_matches_sentence_transformers(minilm: MiniLMTextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    tokens = minilm.tokenizer(SENTENCES)
    states, pooled = minilm(tokens)
    assert tokens.shape == (3, 32) and (minilm.width, minilm.pooled_dim, minilm.context_length) == (384, 384, 32)
    assert states.shape == (3, 32, 384)
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-5)
    assert not minilm.training and not any(p.requires_grad for p in minilm.parameters())
    assert minilm.token_mask(tokens).sum(1).tolist() == [int((t != 0).sum()) for t in tokens]


def test_minilm_path_without_the_files_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="lacks config.json, tokenizer.json"):
        MiniLMTextEncoder(str(tmp_path))


def test_minilm_text_tower_starts_from_the_pretrained_weights(minilm: MiniLMTextEncoder, tmp_path) -> None:
    module = CLIPModule(text_tower="minilm", warmup_steps=1)
    hf = module.model.text.transformer
    reference = minilm.model.state_dict()
    for key, value in hf.state_dict().items():
        assert torch.equal(value, reference[key]), key
    scratch = CLIPModule(text_tower="minilm", load_tower_weights=False).model.text.transformer
    word = "embeddings.word_embeddings.weight"
    assert not torch.equal(scratch.state_dict()[word], reference[word])

    # The tokenizer hook gives WordPiece ids; a short fit and the exported text encoder follow the HF tower.
    assert torch.equal(module.tokenizer(SENTENCES), minilm.tokenizer(SENTENCES))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = {"image": images, "caption": SENTENCES + ["a tree"], "key": list("abcd")}
    fit = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                    limit_val_batches=0)
    fit.fit(module, DataLoader([batch], batch_size=None))
    fit.save_checkpoint(tmp_path / "minilm.ckpt")
    text = CLIPTextEncoder.from_checkpoint(tmp_path / "minilm.ckpt")
    assert (text.width, text.pooled_dim, text.context_length) == (384, 128, 32)
    tokens = text.tokenizer(SENTENCES)
    states, pooled = text(tokens)
    module.eval().requires_grad_(False)
    torch.testing.assert_close(pooled, module.model.encode_text(tokens), rtol=0, atol=1e-5)
    hidden = module.model.text.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
    torch.testing.assert_close(states, hidden, rtol=0, atol=1e-5)


def test_efficientnet_image_tower_starts_from_imagenet_weights(tmp_path) -> None:
    from lightning_diffusion.pretrained.efficientnet import load_efficientnet_lite0

    reference = load_efficientnet_lite0().state_dict()
    module = CLIPModule(image_tower="efficientnet_lite0")
    trunk = module.model.visual.trunk.state_dict()
    assert set(reference) - set(trunk) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(value, reference[key]) for key, value in trunk.items())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(module.normalize_images(images), images)  # TF weights take [-1, 1] as they are
    features, _ = module(images, module.tokenizer(["a", "b"]))
    assert features.shape == (2, 128)
    with pytest.raises(UserError, match="does not exist"):
        CLIPModule(image_tower="efficientnet_lite0", efficientnet_weights=str(tmp_path / "missing.pth"))


def test_locked_towers_keep_their_weights_and_batchnorm_activations(tmp_path) -> None:
    torch.manual_seed(0)
    kwargs = dict(image_tower="efficientnet_lite0", text_tower="minilm", load_tower_weights=False, warmup_steps=1)
    module = CLIPModule(**kwargs, lock_image_tower=True, lock_text_tower=True)
    unlocked = CLIPModule(**kwargs)
    unlocked.model.load_state_dict(module.model.state_dict(), strict=False)  # frozen BN has no batch counters
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # timm's fused BatchNorm+activation survives the freeze (open_clip's own freeze drops it)
        torch.testing.assert_close(module.model.visual.trunk(module.normalize_images(images)),
                                   unlocked.model.visual.trunk.eval()(unlocked.normalize_images(images)))
    frozen = {name: p.detach().clone() for name, p in module.model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.trunk.") for n in frozen) and any(n.startswith("text.transformer.") for n in frozen)
    assert set(trainable) == {"visual.head.proj.weight", "text.proj.weight", "logit_scale"}

    batch = {"image": images, "caption": SENTENCES + ["a tree"], "key": list("abcd")}
    fit = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    fit.fit(module, DataLoader([batch, batch], batch_size=None), DataLoader([batch], batch_size=None))
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert not any(torch.equal(params[name], value) for name, value in trainable.items())
    assert not module.model.visual.trunk.training and not module.model.text.transformer.training
    assert module.model.visual.head.training  # validation restored the modes

    fit.save_checkpoint(tmp_path / "locked.ckpt")
    from lightning_diffusion.clip import CLIPImageEncoder

    encoder = CLIPImageEncoder.from_checkpoint(tmp_path / "locked.ckpt")
    module.eval()
    torch.testing.assert_close(encoder(images), module(images, module.tokenizer(batch["caption"]))[0])
