"""The paper's continue-tuning workflow at toy scale, with the project's own tools: a tiny Llama with
Llama-3's special-token layout (128,256 ids, ``<|begin_of_text|>`` 128000, ``<|end_of_text|>`` 128001,
Llama-3-Instruct's generation config) and a byte-level BPE ``tokenizer.json`` goes through
``import-hf --layout published``, ``preprocess_data.py`` with its tokenizer, a few
``pretrain_moh.py --finetune`` iterations (the validation loss falls), ``export-hf`` and ``generate``,
which stops at the original EOS id. The special ids, chat template and generation config travel
with and without tokenizer files."""

import json
import re
import shutil
import textwrap

import pytest
import torch

from megatron_moh import checkpoint
from megatron_moh.commands import preprocess_data
from megatron_moh.conversion import hf_generation
from megatron_moh.conversion.hf_checkpoint import finetune_flags
from tests.hf_support import (
    LLAMA3_BOS,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_EOS,
    LLAMA3_EOT,
    LLAMA3_VOCAB,
    llama3_style_tokenizer,
    run_offline,
)
from tests.integration.checkpoint_runner import run_worker
from tests.integration.test_hf_conversion import tool
from tests.launcher import launch

pytestmark = pytest.mark.slow  # one short training run of a model with a 128,256-id vocabulary

SEQ = 64
# Llama-3-8B-Instruct's generation_config.json, as published.
GENERATION = {"bos_token_id": LLAMA3_BOS, "eos_token_id": [LLAMA3_EOS, LLAMA3_EOT], "do_sample": True,
              "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.40.0.dev0"}
# One word per document: after a word the next id is always the EOS, so a few iterations teach it.
WORDS = "the of and to in is for on that with as by at from it be this which or are an not".split()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # chat_template.jinja stays: it travels alone


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A random transformers Llama saved as Meta ships Llama-3: weights, config, generation config and a
    tokenizer.json directory (no sentencepiece model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama3")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         bos_token_id=LLAMA3_BOS, eos_token_id=LLAMA3_EOS, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    llama3_style_tokenizer(directory, [" ".join(WORDS)] * 20 + [textwrap.dedent(__doc__)])
    return directory


def _without_tokenizer(directory, out):
    shutil.copytree(directory, out)
    for name in TOKENIZER_FILES:
        (out / name).unlink()
    return out


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["no-tokenizer-files", "tokenizer-json"])
def test_special_tokens_and_generation_settings_travel(llama3, tmp_path, with_tokenizer):
    """import-hf then export-hf --dense: config.json's bos/eos ids, generation_config.json and the chat
    template come back as Meta wrote them (the export used to write Llama-2's 1 and 2)."""
    source = llama3 if with_tokenizer else _without_tokenizer(llama3, tmp_path / "bare")
    assert tool("import-hf", "--hf", source, "--out", tmp_path / "ckpt", "--layout", "dense") is None
    carried = hf_generation.read(tmp_path / "ckpt")
    assert carried["special_token_ids"] == {"bos_token_id": LLAMA3_BOS, "eos_token_id": LLAMA3_EOS,
                                            "pad_token_id": None}
    assert tool("export-hf", "--load", tmp_path / "ckpt", "--out", tmp_path / "hf", "--dense") is None
    exported = tmp_path / "hf"
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (
        LLAMA3_BOS, LLAMA3_EOS, None)
    assert json.loads((exported / "generation_config.json").read_text()) == GENERATION
    if with_tokenizer:
        from transformers import AutoTokenizer

        ours, theirs = AutoTokenizer.from_pretrained(exported), AutoTokenizer.from_pretrained(llama3)
        text = "the end of it <|end_of_text|>"
        assert ours(text).input_ids == theirs(text).input_ids and ours(text).input_ids[0] == LLAMA3_BOS
        assert ours.chat_template == LLAMA3_CHAT_TEMPLATE
    else:
        assert not (exported / "tokenizer.json").exists()
        assert (exported / "chat_template.jinja").read_text() == LLAMA3_CHAT_TEMPLATE


def test_a_tokenizer_smaller_than_the_vocabulary_trains_with_the_checkpoint(tmp_path):
    """Qwen2 ships 151,665 tokenizer ids for 151,936 embedding rows; megatron pads the tokenizer's size, so the
    import picks a --make-vocab-size-divisible-by (a multiple of the requested 128) at which both pad alike."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path / "qwen2"
    llama3_style_tokenizer(directory, [" ".join(WORDS)] * 20)
    vocab = LLAMA3_VOCAB + 300  # rows no id reaches, as in Qwen2
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                 use_sliding_window=False)).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)  # as training reads it: the class config.json names
    assert tool("import-hf", "--hf", directory, "--out", tmp_path / "ckpt", "--layout", "dense",
                "--tensor-model-parallel-size", "2") is None
    args = checkpoint.read_checkpoint_args(tmp_path / "ckpt")
    divisor = args.make_vocab_size_divisible_by
    assert divisor % 128 == 0 and divisor > 128 and args.padded_vocab_size >= vocab
    assert vocab_size_with_padding(len(tokenizer), args, logging_enabled=False) == args.padded_vocab_size
    flags = finetune_flags(args)
    assert flags[flags.index("--make-vocab-size-divisible-by") + 1] == str(divisor)


GENERATE = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    job = json.load(open(sys.argv[1]))
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["dir"])
    prompt = tokenizer(job["prompt"], return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=job["max_new_tokens"], do_sample=False)
    torch.save(dict(prompt=prompt[0].tolist(), out=out[0].tolist(), eos=model.generation_config.eos_token_id,
                    cls=type(model).__name__), job["out"])
''')
VALIDATION = re.compile(r"validation loss at iteration (\d+) .*?lm loss value: ([0-9.E+-]+)")


def test_continue_tuning_a_llama3_end_to_end(llama3, tmp_path):
    # 1. import in the published layout: query-norm router, 4 shared + top-2 of 4 routed = 75% of heads
    imported = tmp_path / "imported"
    assert tool("import-hf", "--hf", llama3, "--out", imported, "--layout", "published") is None
    args = checkpoint.read_checkpoint_args(imported)
    assert (args.moh_num_shared_heads, args.moh_topk, args.moh_router, args.moh_gate) == (4, 2, "query_norm",
                                                                                           "binary")
    # 2. data, with the model's own tokenizer
    docs = tmp_path / "docs.jsonl"
    rng = torch.Generator().manual_seed(0)
    docs.write_text("".join(json.dumps({"text": WORDS[int(i)]}) + "\n"
                            for i in torch.randint(len(WORDS), (4000,), generator=rng)))
    prefix = tmp_path / "data" / "words"
    assert preprocess_data.main(["--input", str(docs), "--output-prefix", str(prefix), "--tokenizer-model",
                                 str(llama3), "--no-progress"]) == 0
    # 3. continue training with the flags import-hf printed
    flags = finetune_flags(args)
    assert flags[flags.index("--tokenizer-type"):][:4] == ["--tokenizer-type", "HuggingFaceTokenizer",
                                                           "--tokenizer-model", str(llama3.resolve())]
    run = tmp_path / "run"
    [result] = launch(run_worker, 1, [
        *flags, "--load", str(imported), "--finetune", "--data-path", str(prefix), "--split", "95,5,0",
        "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "30",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--eval-interval", "10", "--eval-iters", "2",
        "--log-interval", "10", "--save", str(run), "--save-interval", "30"], timeout=900)
    assert result["code"] is None, result["err"][-3000:]
    validation = [float(loss) for _, loss in VALIDATION.findall(result["out"])]
    assert len(validation) >= 3 and validation[-1] < validation[0] - 1.0, validation
    assert hf_generation.read(run) == hf_generation.read(imported)  # carried to --save before training
    # 4. export, and 5. generate: greedy decoding stops at Llama-3's EOS, where the documents ended
    exported = tmp_path / "hf"
    assert tool("export-hf", "--load", run, "--out", exported) is None
    assert json.loads((exported / "generation_config.json").read_text()) == GENERATION
    job = dict(dir=str(exported), prompt="the", max_new_tokens=16, out=str(tmp_path / "generated.pt"))
    generated = run_offline(GENERATE, job, tmp_path)
    assert generated["cls"] == "MoHLlamaForCausalLM" and generated["eos"] == [LLAMA3_EOS, LLAMA3_EOT]
    new = generated["out"][len(generated["prompt"]):]
    assert generated["prompt"][0] == LLAMA3_BOS and new and new[-1] == LLAMA3_EOS, generated
    assert len(new) < job["max_new_tokens"] and LLAMA3_EOS not in new[:-1]  # it stopped there
