"""Tiny random pretrained text encoders saved in the libraries' own layouts, offline: a Stable-Diffusion-style
`text_encoder/` + `tokenizer/` CLIPTextModel pair (the tokenizer built from open_clip's BPE vocabulary), a
T5EncoderModel folder with a Unigram tokenizer trained on the fly, and open_clip weights files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

CORPUS = ["a 3D rendered emoji of fox", "a flat vector emoji of red apple", "a flat vector emoji of koala",
          "a 3D rendered emoji of cat", "hello world"]


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIPTokenizer (vocab.json + merges.txt) with OpenAI CLIP's vocabulary, from the BPE file open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    merges = [tuple(line.split()) for line in gzip.open(default_bpe()).read().decode().split("\n")[1:49152 - 256 - 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token).save_pretrained(folder)
    return folder


def hf_clip_folder(root: Path, seed: int = 0, safetensors: bool = True, pad_token: str = "<|endoftext|>") -> Path:
    """`root/text_encoder` (a 2-layer width-32 CLIPTextModel) and `root/tokenizer`; returns the text_encoder path."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModel(config).save_pretrained(root / "text_encoder", safe_serialization=safetensors)
    clip_tokenizer(root / "tokenizer", pad_token)
    return root / "text_encoder"


def t5_folder(folder: Path, seed: int = 0) -> Path:
    """A 2-layer width-32 T5EncoderModel with a 64-piece Unigram tokenizer, both in `folder`."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(CORPUS * 10, vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"],
                                unk_token="<unk>")
    tokenizer = T5TokenizerFast(tokenizer_object=unigram._tokenizer, eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def open_clip_weights(path: Path, arch: str = "ld-tiny-vit", seed: int = 0) -> Path:
    """The state dict of a random open_clip model `arch` (safetensors, or a torch.save pickle for `.bin`)."""
    import open_clip
    from safetensors.torch import save_file

    from lightning_diffusion.clip.model_configs import register_project_configs

    register_project_configs()
    torch.manual_seed(seed)
    state = open_clip.create_model(arch).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path
