"""Shared fixtures: tiny random causal LMs of several architectures and a word-level tokenizer."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
)

WORDS = (
    "the a an door ancient creaked open and of to in is was it he she they we you old new dark light "
    "house king queen night day sea ship town bread lamp bell dog girl boy man woman fire water stone "
    "said went came saw then there here . , ! ?"
).split()
VOCAB = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
ARCHS = ["gpt2", "llama", "qwen2", "mistral"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def make_model(arch: str, seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    v = 64
    common = dict(vocab_size=v, num_hidden_layers=layers, num_attention_heads=4, hidden_size=32,
                  intermediate_size=64, max_position_embeddings=128, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=layers, n_head=4,
                                           eos_token_id=1, bos_token_id=1, pad_token_id=0))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=1, **common))
    else:
        raise KeyError(arch)
    # sharper next-token distributions than the default init, so sampling is not near-uniform
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama and the word-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def arch_model(request):
    return make_model(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M (dequantised once, then loaded from the safetensors cache)."""
    import phaselm

    return phaselm.load_causal_lm()


TINY_V = 40


def tiny_phaselm(kind: str, seed: int = 0, n_ssm: int = 2, sharpen: bool = False, **extra):
    """A tiny phaselm model in eval mode: ``gpt`` (2 layers), ``gpt_conv`` (the same with a short
    convolution of kernel 3 in front of attention), ``phasegpt`` (3 layers, phase layers 1
    and 2, 4 oscillators), ``pma`` (``n_ssm`` Mamba blocks, then PMA blocks, 3 layers) or ``mamba``
    (2 Mamba blocks only); vocabulary 40, context 32, 2 heads of width 8. The phase projections are
    spread (N(0, 1)) so the oscillators matter; ``sharpen`` scales the head ×4 so greedy choices are
    clear-cut."""
    import phaselm

    torch.manual_seed(seed)
    sizes = dict(vocab_size=TINY_V, block_size=32, n_head=2, n_embd=16, **extra)
    if kind in ("gpt", "gpt_conv"):
        model = phaselm.GPTForCausalLM(phaselm.GPTConfig(n_layer=2, short_conv=3 if kind == "gpt_conv" else 0, **sizes))
    elif kind == "phasegpt":
        model = phaselm.PhaseGPTForCausalLM(phaselm.PhaseGPTConfig(n_layer=3, phase_layers=[1, 2], n_osc=4, **sizes))
    elif kind == "pma":
        model = phaselm.PMAForCausalLM(phaselm.create_tiny_config(n_layer=3, n_ssm=n_ssm, d_state=4, **sizes))
    else:  # a pure Mamba stack: its first block also records the sequence length (see phaselm.models.pma)
        model = phaselm.PMAForCausalLM(phaselm.create_tiny_config(n_layer=2, n_ssm=2, d_state=4, **sizes))
    with torch.no_grad():
        for m in model.phase_layers().values():
            m.phase_proj.weight.normal_(0, 1.0)
        if sharpen:
            model.lm_head.weight.mul_(4.0)
    return model.eval()
