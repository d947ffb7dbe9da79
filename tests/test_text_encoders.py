"""Pretrained text encoders for the denoiser (HF CLIPTextModel folder, T5EncoderModel folder, open_clip weights),
built tiny and random with the libraries' own classes, saved to temporary folders, never downloaded: each gives
the interface's states / mask / pooled vector (checked against the libraries' own outputs), trains a denoiser,
is stored by encode-latents, and a wrong folder is one line naming what is missing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from denoiser_support import TINY_UNET, fixed_batch, loader, one_thread, trainer
from lightning_diffusion.errors import UserError
from lightning_diffusion.text_encoders import TextEncoderSpec
from pretrained_text_support import hf_clip_folder, open_clip_weights, t5_folder

PROMPTS = ["a 3D rendered emoji of fox", "a flat vector emoji of red apple", ""]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {"sd": root / "sd", "hf_clip": hf_clip_folder(root / "sd"), "t5": t5_folder(root / "t5"),
            "open_clip": open_clip_weights(root / "open_clip" / "ld-tiny-vit.safetensors")}


def specs(pretrained: dict[str, Path]) -> dict[str, TextEncoderSpec]:
    return {"hf_clip": TextEncoderSpec("hf_clip", str(pretrained["hf_clip"])),
            "hf_clip_penultimate": TextEncoderSpec("hf_clip", str(pretrained["hf_clip"]), layer="penultimate"),
            "t5": TextEncoderSpec("t5", str(pretrained["t5"])),
            "open_clip": TextEncoderSpec("open_clip", str(pretrained["open_clip"]), arch="ld-tiny-vit")}


@pytest.mark.parametrize("name", ["hf_clip", "hf_clip_penultimate", "t5", "open_clip"])
def test_interface(pretrained: dict[str, Path], name: str) -> None:
    encoder = specs(pretrained)[name].load()
    tokens = encoder.tokenize(PROMPTS)
    states, pooled = encoder(tokens)
    mask = encoder.token_mask(tokens)
    assert tokens.shape == (3, encoder.context_length) and mask.dtype == torch.bool
    assert states.shape == (3, encoder.context_length, encoder.width) and pooled.shape == (3, encoder.pooled_dim)
    assert mask[:, 0].all() and (mask.sum(1)[:2] > mask.sum(1)[2]).all()  # the empty prompt has fewer real tokens
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_hf_clip_matches_the_library_and_open_clip_tokens(pretrained: dict[str, Path]) -> None:
    import open_clip
    from transformers import CLIPTextModel

    encoder = specs(pretrained)["hf_clip"].load()
    tokens = encoder.tokenize(PROMPTS)
    reference = CLIPTextModel.from_pretrained(str(pretrained["hf_clip"])).eval()
    with torch.no_grad():
        out = reference(input_ids=tokens)
    states, pooled = encoder(tokens)
    torch.testing.assert_close(states, out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)
    # the CLIP vocabulary: open_clip's tokenizer gives the same ids on the real tokens (it pads with 0, SD 1.x with EOS)
    mask = encoder.token_mask(tokens)
    assert torch.equal(tokens * mask, open_clip.get_tokenizer("ViT-B-32")(PROMPTS) * mask)
    assert torch.equal(mask, open_clip.get_tokenizer("ViT-B-32")(PROMPTS).cumsum(1).roll(1, 1).ne(
        open_clip.get_tokenizer("ViT-B-32")(PROMPTS).cumsum(1)) | (torch.arange(77) == 0))


def test_penultimate_layer_is_a_one_layer_shorter_model_with_the_final_norm(pretrained: dict[str, Path]) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = specs(pretrained)["hf_clip_penultimate"].load()
    tokens = encoder.tokenize(PROMPTS)
    config = CLIPTextConfig.from_pretrained(str(pretrained["hf_clip"]), num_hidden_layers=1)
    shorter = CLIPTextModel(config).eval()
    missing = shorter.load_state_dict(encoder.model.state_dict(), strict=False).missing_keys
    assert not missing
    with torch.no_grad():
        expected = shorter(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(encoder(tokens)[0], expected, rtol=1e-6, atol=1e-6)


def test_t5_pooled_is_the_mean_over_real_tokens_and_ignores_padding(pretrained: dict[str, Path]) -> None:
    encoder = specs(pretrained)["t5"].load()
    tokens = encoder.tokenize(PROMPTS[:1])
    real = int(encoder.token_mask(tokens).sum())
    states, pooled = encoder(tokens)
    with torch.no_grad():
        unpadded = encoder.model(input_ids=tokens[:, :real]).last_hidden_state
    torch.testing.assert_close(states[:, :real], unpadded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, unpadded.mean(1), rtol=1e-5, atol=1e-6)


def test_open_clip_pooled_is_encode_text(pretrained: dict[str, Path]) -> None:
    import open_clip

    encoder = specs(pretrained)["open_clip"].load()
    reference = open_clip.create_model("ld-tiny-vit", pretrained=str(pretrained["open_clip"])).eval()
    tokens = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(encoder(tokens)[1], reference.encode_text(tokens), rtol=0, atol=1e-5)


def test_pickled_weights_load_weights_only(pretrained: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would unpickle everything
    """`.bin` files give the same outputs as the safetensors ones; a pickle that would run code is refused."""
    from transformers import CLIPTextModel

    folder = tmp_path / "sd_bin" / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((pretrained["hf_clip"] / "config.json").read_text())
    state = CLIPTextModel.from_pretrained(str(pretrained["hf_clip"])).state_dict()
    legacy = {f"text_model.{k}": v for k, v in state.items()}  # the key names of SD's pytorch_model.bin files
    torch.save({**legacy, "text_model.embeddings.position_ids": torch.arange(77)[None]}, folder / "pytorch_model.bin")
    (tmp_path / "sd_bin" / "tokenizer").symlink_to(pretrained["sd"] / "tokenizer")
    tokens = specs(pretrained)["hf_clip"].load().tokenize(PROMPTS)
    torch.testing.assert_close(TextEncoderSpec("hf_clip", str(folder)).load()(tokens),
                               specs(pretrained)["hf_clip"].load()(tokens), rtol=0, atol=0)
    bin_weights = open_clip_weights(tmp_path / "oc.bin")
    torch.testing.assert_close(TextEncoderSpec("open_clip", str(bin_weights), "ld-tiny-vit").load()(tokens[:, :32]),
                               specs(pretrained)["open_clip"].load()(tokens[:, :32]), rtol=0, atol=0)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match="refused"):
        TextEncoderSpec("hf_clip", str(folder)).load()
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match="refused"):
        TextEncoderSpec("open_clip", str(tmp_path / "evil.bin"), "ld-tiny-vit").load()


def test_wrong_folders_are_one_line_naming_the_file(pretrained: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((pretrained["hf_clip"] / "config.json").read_text())
    cases = [
        (TextEncoderSpec("hf_clip", str(tmp_path / "missing")), r"'.*missing' is not a folder: .*CLIPTextModel"),
        (TextEncoderSpec("hf_clip", str(tmp_path / "empty")), r"'.*empty' lacks config.json: expected .*tokenizer"),
        (TextEncoderSpec("hf_clip", str(no_weights)), r"no weights \(model.safetensors"),
        (TextEncoderSpec("t5", str(pretrained["hf_clip"])), r"describes a 'clip_text_model' model, not 't5'"),
        (TextEncoderSpec("hf_clip", str(pretrained["t5"])), r"describes a 't5' model"),
        (TextEncoderSpec("hf_clip", None), r"model.text_encoder_path is not set"),
        (TextEncoderSpec("open_clip", str(pretrained["open_clip"])), r"set model.text_encoder_arch"),
        (TextEncoderSpec("open_clip", str(pretrained["open_clip"]), "ViT-B-32"), r"could not be loaded into ViT-B-32"),
        (TextEncoderSpec("open_clip", str(tmp_path / "empty")), r"lacks open_clip_config.json"),
        (TextEncoderSpec("t5", str(pretrained["t5"]), layer="penultimate"), r"penultimate is for .*hf_clip"),
        (TextEncoderSpec("bert", "x"), r"unknown model.text_encoder 'bert'"),
    ]
    for spec, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            spec.load()
        assert "\n" not in str(caught.value)
    # the SD layout without its tokenizer/ sibling names both places looked at
    lone = tmp_path / "lone" / "text_encoder"
    lone.mkdir(parents=True)
    for file in pretrained["hf_clip"].iterdir():
        (lone / file.name).symlink_to(file)
    with pytest.raises(UserError, match=r"no tokenizer files .* in '.*text_encoder' nor in '.*lone/tokenizer'"):
        TextEncoderSpec("hf_clip", str(lone)).load()


@pytest.mark.parametrize("name", ["hf_clip_penultimate", "t5", "open_clip"])
def test_denoiser_fits_with_each_encoder(pretrained: dict[str, Path], tmp_path: Path, name: str) -> None:
    from lightning_diffusion.diffusion.module import Denoiser

    spec = specs(pretrained)[name]
    model = Denoiser(**TINY_UNET, conditioning="text", text_encoder=spec.kind, text_encoder_path=spec.path,
                     text_encoder_arch=spec.arch, text_layer=spec.layer, ema_decay=None)
    assert model.null.null_token.shape == (spec.load().width,)
    with one_thread():
        trainer(tmp_path, max_steps=2).fit(model, loader(fixed_batch(4), 2))
        images = model.generate(["a flat vector emoji of koala"], steps=2, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_encode_latents_stores_an_hf_clip_folder_and_the_denoiser_checks_it(pretrained: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from data_pipelines.datamodule import ShardDataModule
    from lightning_diffusion.diffusion.module import Denoiser
    from test_encode_latents import SIZE, encode, read_all, tiny_vae_checkpoint, write_image_shards

    write_image_shards(tmp_path / "images")
    tiny_vae_checkpoint(tmp_path / "vae.ckpt")
    folder = str(pretrained["sd"])  # the pipeline folder (text_encoder/ + tokenizer/) works as well
    out = encode(tmp_path, "latents", "--text-encoder", folder, "--text-encoder-kind", "hf_clip",
                 "--text-layer", "penultimate", "--batch-size", "4")
    stored = read_all(str(out / "train-*.tar"), ["latent.npy", "text_emb.npy", "text_pooled.npy"], [])
    encoder = TextEncoderSpec("hf_clip", folder, layer="penultimate").load()
    states, pooled = encoder(encoder.tokenize(stored["caption"]))
    torch.testing.assert_close(stored["text_emb"], states.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(stored["text_pooled"], pooled.half().float(), rtol=0, atol=0)

    def fit(layer: str) -> None:
        model = Denoiser(**{**TINY_UNET, "attention_resolutions": (4,)}, conditioning="text", text_encoder="hf_clip",
                         text_encoder_path=folder, text_layer=layer, space="latent",
                         vae_checkpoint=str(tmp_path / "vae.ckpt"), ema_decay=None)
        urls = str(out / "train-*.tar")
        data = ShardDataModule(train_urls=urls, val_urls=urls, image_size=SIZE, batch_size=4, num_workers=0,
                               image_keys=[], tensor_keys=["latent.npy", "text_emb.npy", "text_pooled.npy"])
        with one_thread():
            trainer(tmp_path, max_steps=1).fit(model, datamodule=data)

    fit("penultimate")
    with pytest.raises(UserError, match=r"another text encoder \(hf_clip .*sd, penultimate layer\) than this denoiser's "
                       r"\(hf_clip .*sd, last layer\): re-run .* --text-encoder-kind hf_clip, or drop"):
        fit("last")


def test_encode_latents_cli_names_a_missing_folder_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_diffusion.cli import main
    from test_encode_latents import tiny_vae_checkpoint, write_image_shards

    write_image_shards(tmp_path / "images")
    tiny_vae_checkpoint(tmp_path / "vae.ckpt")
    code = main(["encode-latents", "--vae", str(tmp_path / "vae.ckpt"), "--in", str(tmp_path / "images" / "train-*.tar"),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--text-encoder", str(tmp_path / "nowhere"),
                 "--text-encoder-kind", "t5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --text-encoder '")
    assert "nowhere' is not a folder: point it at a Hugging Face T5EncoderModel folder" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overlay, expected", [
    ("text_sd15_clip_tiny", {"text_encoder": "hf_clip", "text_encoder_path": "pretrained/clip-vit-large-patch14"}),
    ("text_sd2_clip_tiny", {"text_encoder": "hf_clip", "text_layer": "last"}),
    ("text_open_clip_tiny", {"text_encoder": "open_clip", "text_encoder_arch": "ViT-L-14"}),
    ("text_t5_tiny", {"text_encoder": "t5", "text_encoder_path": "pretrained/flan-t5-base"}),
])
def test_the_text_encoder_overlays_set_plain_arguments_and_a_run_folder(overlay: str, expected: dict,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """Merged with latent_text_tiny.yaml (LightningCLI type-checks them), an overlay sets the encoder by plain typed
    arguments and a run folder of its own (which holds every output: no callback names another folder)."""
    import yaml

    from lightning_diffusion.cli import main

    folder = Path(__file__).resolve().parents[1] / "configs" / "denoiser"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(folder / "latent_text_tiny.yaml"), "--config", str(folder / f"{overlay}.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)
    args = merged["model"]["init_args"]
    assert {key: args[key] for key in expected} == expected
    root = merged["trainer"]["default_root_dir"]
    assert root == f"runs/denoiser_{overlay}"
    base = yaml.safe_load((folder / "latent_text_tiny.yaml").read_text())
    assert [c["class_path"] for c in merged["trainer"]["callbacks"]] == [c["class_path"] for c in
                                                                         base["trainer"]["callbacks"]]
    assert not any(c["init_args"].get("dirpath") for c in merged["trainer"]["callbacks"])  # all below root


def test_a_full_clip_model_folder_loads_its_text_tower_quietly(tmp_path: Path, capfd: pytest.CaptureFixture,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """SD 1.x's encoder is openai/clip-vit-large-patch14, a whole CLIPModel: the text tower equals CLIPModel's, and
    its unused vision weights do not print a load report (hundreds of lines for ViT-L/14)."""
    from transformers import CLIPConfig, CLIPModel

    from pretrained_text_support import clip_tokenizer

    text = hf_clip_folder(tmp_path / "sd", seed=3)
    folder = clip_tokenizer(tmp_path / "full")  # the tokenizer files lie beside the weights, as in the HF repo
    torch.manual_seed(1)
    config = CLIPConfig(text_config=json.loads((text / "config.json").read_text()),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16), projection_dim=16)
    full = CLIPModel(config).eval()
    full.save_pretrained(folder)
    capfd.readouterr()
    encoder = TextEncoderSpec("hf_clip", str(folder)).load()
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err + caplog.text
    tokens = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        reference = full.text_model(input_ids=tokens)
    states, pooled = encoder(tokens)
    torch.testing.assert_close(states, reference.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(pooled, reference.pooler_output, rtol=0, atol=0)


def test_a_folder_missing_weights_is_refused_not_started_at_random(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    text = hf_clip_folder(tmp_path / "sd")
    weights = load_file(str(text / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layers.1." not in k}, str(text / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks \d+ weights of CLIPTextModel \(first: .*layers\.1\."):
        TextEncoderSpec("hf_clip", str(text)).load()
