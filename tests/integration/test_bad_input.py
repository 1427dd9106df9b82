"""Bad input to pretrain_moh.py and the three tools: each case stops with its exit code and ONE line
naming the problem, no traceback, before any work (no process group, nothing printed on stdout,
megatron's argument dump included), and every file that existed is byte-identical afterwards,
with nothing new beside it. All cases run in one fresh process (tests/integration/bad_input_runner.py).

The table is the place to add a case: (id, program, argv, exit code, words the message must hold).
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_moh import tokenizer as tk
from megatron_moh.data import corpus, preprocess
from tests.hf_support import llama3_style_tokenizer
from tests.integration.checkpoint_runner import run_worker
from tests.launcher import launch

pytestmark = pytest.mark.slow  # one tiny training run, then ~50 refusals in one process

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "1e-3", "--eval-iters", "0", "--eval-interval", "1000"]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500"]
RUN = [*MODEL, *MOCK, "--train-iters", "2"]

PRETRAIN, CONVERT, PREPROCESS, TOKENIZER = "pretrain_moh.py", "convert_checkpoint.py", "preprocess_data.py", \
    "train_tokenizer.py"


def cases(r: Path) -> list[tuple[str, str, list[str], int, list[str]]]:
    """Every case; ``r`` is the root holding the files the cases use (see the `root` fixture)."""
    d, tok, ck = f"{r}/data", f"{r}/tok.model", f"{r}/ckpt"
    sp = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tok]
    return [
        # pretrain_moh.py: impossible numbers (megatron asserts some without a message)
        ("train-iters", PRETRAIN, [*RUN, "--train-iters", "-5"], 1, ["--train-iters -5", "at least 1"]),
        ("hidden-size", PRETRAIN, [*RUN, "--hidden-size", "-64"], 1, ["--hidden-size -64", "at least 1"]),
        ("num-layers", PRETRAIN, [*RUN, "--num-layers", "0"], 1, ["--num-layers 0"]),
        ("lr", PRETRAIN, [*RUN, "--lr", "-1"], 1, ["--lr -1.0", "0 or more"]),
        ("micro-batch", PRETRAIN, [*RUN, "--micro-batch-size", "0"], 1, ["--micro-batch-size 0"]),
        ("global-batch", PRETRAIN, [*RUN, "--global-batch-size", "0"], 1, ["--global-batch-size 0"]),
        ("min-lr", PRETRAIN, [*RUN, "--min-lr", "0.1"], 1, ["--min-lr 0.1 is above --lr 0.001"]),
        ("dropout", PRETRAIN, [*RUN, "--hidden-dropout", "1.5"], 1, ["--hidden-dropout 1.5", "[0, 1)"]),
        ("eval-iters", PRETRAIN, [*RUN, "--eval-iters", "-1"], 1, ["--eval-iters -1"]),
        ("balance-coeff", PRETRAIN, [*RUN, "--moh-load-balance-coeff", "-0.1"], 1, ["--moh-load-balance-coeff -0.1"]),
        ("batch-split", PRETRAIN, [*RUN, "--global-batch-size", "5"], 1, ["global_batch_size (5)", "divisible"]),
        ("seq-over-positions", PRETRAIN, [*RUN, "--seq-length", "64"], 1, ["max_position_embeddings (32)", "64"]),
        # pretrain_moh.py: flags
        ("unknown-flag", PRETRAIN, [*RUN, "--no-such-flag"], 2, ["unrecognized arguments: --no-such-flag"]),
        ("bad-choice", PRETRAIN, [*RUN, "--moh-router", "hash"], 2, ["--moh-router", "invalid choice: 'hash'"]),
        ("not-a-number", PRETRAIN, [*RUN, "--lr", "fast"], 2, ["--lr", "invalid float value: 'fast'"]),
        ("mla", PRETRAIN, [*RUN, "--multi-latent-attention"], 1, ["multi-latent attention", "drop --multi-latent"]),
        ("fp8", PRETRAIN, [*RUN, "--fp8-format", "hybrid"], 1, ["--fp8-format hybrid", "Transformer Engine"]),
        ("te-spec", PRETRAIN, [*RUN, "--transformer-impl", "transformer_engine"], 1, ["Transformer Engine"]),
        ("moh-topk", PRETRAIN, [*RUN, "--moh-topk", "9"], 1, ["moh_topk=9", "lower moh_topk"]),
        ("moh-shared", PRETRAIN, [*RUN, "--moh-num-shared-heads", "-1"], 1, ["moh_num_shared_heads=-1"]),
        ("checkpoint-args", PRETRAIN, [*RUN, "--use-checkpoint-args"], 1, ["--use-checkpoint-args needs --load"]),
        ("moe-experts-per-rank", PRETRAIN, [*RUN, "--num-experts", "3", "--expert-model-parallel-size", "2"], 1,
         ["--num-experts 3 is not divisible by --expert-model-parallel-size 2"]),
        ("moe-megatron-config", PRETRAIN, [*RUN, "--num-experts", "4", "--moe-shared-expert-intermediate-size", "64",
                                           "--moe-shared-expert-overlap"], 1,
         ["moe_shared_expert_overlap only works with alltoall or flex token dispatcher"]),
        # pretrain_moh.py: outputs that would fail at the first save or log
        ("save-under-file", PRETRAIN, [*RUN, "--save", f"{r}/afile/ckpt", "--save-interval", "1"], 1,
         [f"--save {r}/afile/ckpt", "is a file, not a directory"]),
        ("save-no-interval", PRETRAIN, [*RUN, "--save", f"{r}/new-ckpt"], 1, ["--save needs --save-interval"]),
        ("tensorboard-under-file", PRETRAIN, [*RUN, "--tensorboard-dir", f"{r}/afile/tb"], 1,
         ["--tensorboard-dir", "is a file"]),
        ("legacy-format", PRETRAIN, [*RUN, "--save", f"{r}/new-ckpt", "--save-interval", "1", "--ckpt-format", "torch"],
         1, ["--ckpt-format torch", "torch_dist"]),
        # pretrain_moh.py: data and tokenizer
        ("missing-data", PRETRAIN, [*MODEL, *sp, "--data-path", f"{d}/nothing"], 1, [f"no dataset at {d}/nothing"]),
        ("data-suffix", PRETRAIN, [*MODEL, *sp, "--data-path", f"{d}/good.bin"], 1, ["includes the suffix"]),
        ("truncated-idx", PRETRAIN, [*MODEL, *sp, "--data-path", f"{d}/truncated"], 1,
         [f"{d}/truncated.idx is not a readable megatron index"]),
        ("garbage-idx", PRETRAIN, [*MODEL, *sp, "--data-path", f"{d}/garbage"], 1,
         [f"{d}/garbage.idx is not a readable megatron index"]),
        ("short-bin", PRETRAIN, [*MODEL, *sp, "--data-path", f"{d}/short"], 1, [f"{d}/short.bin has", "truncated"]),
        ("negative-weight", PRETRAIN, [*MODEL, *sp, "--data-path", "0.5", f"{d}/good", "-0.5", f"{d}/other"], 1,
         ["negative"]),
        ("bad-split", PRETRAIN, [*MODEL, *sp, "--data-path", f"{d}/good", "--split", "1,2,3,4"], 1, ["split"]),
        ("not-sentencepiece", PRETRAIN, [*MODEL, "--data-path", f"{d}/good", "--tokenizer-model", f"{r}/notsp.model"],
         1, [f"{r}/notsp.model is not a sentencepiece model"]),
        ("missing-tokenizer", PRETRAIN, [*MODEL, "--data-path", f"{d}/good", "--tokenizer-model", f"{r}/none.model"],
         1, [f"tokenizer model {r}/none.model not found"]),
        ("hf-tokenizer-type", PRETRAIN, [*MODEL, "--data-path", f"{d}/good", "--tokenizer-type",
                                         "HuggingFaceTokenizer", "--tokenizer-model", tok], 1,
         [f"{tok} is a sentencepiece model file but --tokenizer-type is HuggingFaceTokenizer"]),
        ("hf-tokenizer-neither", PRETRAIN, [*MODEL, "--data-path", f"{d}/good", "--tokenizer-type",
                                            "HuggingFaceTokenizer", "--tokenizer-model", f"{r}/empty"], 1,
         [f"{r}/empty is a directory holding neither tokenizer.json nor a sentencepiece .model"]),
        ("hf-data-other-tokenizer", PRETRAIN, [*MODEL, "--data-path", f"{d}/good", "--tokenizer-type",
                                               "HuggingFaceTokenizer", "--tokenizer-model", f"{r}/hf-tok"], 1,
         [f"{d}/good was tokenized with a different tokenizer"]),
        ("vocab-mismatch", PRETRAIN, [*MODEL, "--data-path", f"{d}/good", "--tokenizer-type", "NullTokenizer",
                                      "--vocab-size", "100"], 1, ["vocabulary size mismatch"]),
        # pretrain_moh.py: --load
        ("load-missing", PRETRAIN, [*RUN, "--load", f"{r}/nowhere"], 1, [f"{r}/nowhere does not exist"]),
        ("load-empty", PRETRAIN, [*RUN, "--load", f"{r}/empty"], 1, ["holds no checkpoint"]),
        ("load-other-model", PRETRAIN, [*RUN, "--load", ck, "--hidden-size", "128"], 1,
         ["hidden_size=64 in the checkpoint but 128 here"]),
        ("load-dense-into-moe", PRETRAIN, [*RUN, "--load", ck, "--num-experts", "4"], 1,
         ["num_experts=None in the checkpoint but 4 here"]),
        ("resume-other-schedule", PRETRAIN, [*RUN, "--load", ck, "--train-iters", "4"], 1,
         ["another learning-rate schedule", "--train-iters 2 -> 4", "--override-opt_param-scheduler"]),
        ("resume-other-lr", PRETRAIN, [*RUN, "--load", ck, "--lr", "2e-3"], 1, ["--lr 0.001 -> 0.002"]),
        ("load-damaged-optimizer", PRETRAIN, [*RUN, "--load", f"{r}/ckpt-flipped"], 1,
         [f"{r}/ckpt-flipped/iter_0000002/__0_0.distcp is damaged: optimizer.", "does not match the CRC-32 saved"]),
        ("load-replaced-rows", PRETRAIN, [*RUN, "--load", f"{r}/ckpt-rows"], 1,
         [f"{r}/ckpt-rows/iter_0000002/__0_0.distcp is damaged: embedding.word_embeddings.weight (its bytes ",
          "does not match the CRC-32 saved with it (Bad CRC-32 for file 'archive/data/0')"]),
        # pretrain_moh.py: the --save directory
        ("save-held", PRETRAIN, [*RUN, "--save", f"{r}/held", "--save-interval", "2"], 1,
         [f"--save {r}/held is in use by a run on host ", "wait for it to end, or choose another --save"]),
        ("resume-onto-full-disk", PRETRAIN, [*RUN, "--load", f"{r}/full/ckpt", "--save", f"{r}/full/ckpt",
                                             "--save-interval", "2"], 1,
         [f"no space left on device: --save {r}/full/ckpt has ", "the next checkpoint needs about"]),
        # convert_checkpoint.py
        ("export-missing", CONVERT, ["export-hf", "--load", f"{r}/nowhere", "--out", f"{r}/hf"], 1, ["does not exist"]),
        ("export-existing", CONVERT, ["export-hf", "--load", ck, "--out", f"{r}/out-existing"], 1,
         ["already exists", "--overwrite"]),
        ("export-shard-size", CONVERT, ["export-hf", "--load", ck, "--out", f"{r}/hf", "--max-shard-size", "banana"],
         1, ["--max-shard-size 'banana' is not a size"]),
        ("export-under-file", CONVERT, ["export-hf", "--load", ck, "--out", f"{r}/afile/hf"], 1, ["is a file"]),
        ("export-dense-routed", CONVERT, ["export-hf", "--load", ck, "--out", f"{r}/hf", "--dense"], 1,
         ["only a dense model exports as plain Llama"]),
        ("export-damaged", CONVERT, ["export-hf", "--load", f"{r}/ckpt-rows", "--out", f"{r}/hf"], 1,
         ["is damaged: embedding.word_embeddings.weight", "does not match the CRC-32"]),
        ("export-tokenizer", CONVERT, ["export-hf", "--load", ck, "--out", f"{r}/hf", "--tokenizer-model",
                                       f"{r}/none.model"], 1, ["--tokenizer-model", "does not exist"]),
        ("export-tokenizer-too-big", CONVERT, ["export-hf", "--load", ck, "--out", f"{r}/hf", "--tokenizer-model",
                                               f"{r}/hf-tok"], 1,
         ["has 128256 ids but the model's vocabulary has 512"]),
        ("import-missing", CONVERT, ["import-hf", "--hf", f"{r}/nowhere", "--out", f"{r}/mg", "--layout", "dense"], 1,
         ["config.json does not exist"]),
        ("import-no-config", CONVERT, ["import-hf", "--hf", f"{r}/empty", "--out", f"{r}/mg", "--layout", "dense"],
         1, ["config.json does not exist"]),
        ("import-custom", CONVERT, ["import-hf", "--hf", f"{r}/empty", "--out", f"{r}/mg", "--layout", "custom"], 1,
         ["--layout custom needs --moh-num-shared-heads and --moh-topk"]),
        ("import-tensor-shape", CONVERT, ["import-hf", "--hf", f"{r}/hf-shape", "--out", f"{r}/mg", "--layout",
                                          "dense"], 1,
         ["'model.layers.1.mlp.down_proj.weight' has shape (64, 64), expected (64, 128)"]),
        ("import-tensor-missing", CONVERT, ["import-hf", "--hf", f"{r}/hf-missing", "--out", f"{r}/mg", "--layout",
                                            "dense"], 1, ["state dict has no 'model.layers.1.mlp.up_proj.weight'"]),
        ("import-damaged", CONVERT, ["import-hf", "--hf", f"{r}/hf-damaged", "--out", f"{r}/mg", "--layout", "dense"],
         1, ["model.safetensors", "does not fit its data_offsets", "the file is damaged"]),
        ("convert-usage", CONVERT, ["export-hf", "--load", ck], 2, ["the following arguments are required: --out"]),
        # preprocess_data.py
        ("preprocess-missing", PREPROCESS, ["--input", f"{r}/none.txt", "--output-prefix", f"{d}/x",
                                            "--tokenizer-model", tok], 2, [f"input {r}/none.txt does not exist"]),
        ("preprocess-binary-txt", PREPROCESS, ["--input", f"{r}/binary.txt", "--output-prefix", f"{d}/x",
                                               "--tokenizer-model", tok], 2,
         [f"input {r}/binary.txt:2 is not UTF-8 text (byte 128 of the file is 0x80)"]),
        ("preprocess-binary-jsonl", PREPROCESS, ["--input", f"{r}/binary.jsonl", "--output-prefix", f"{d}/x",
                                                 "--tokenizer-model", tok], 2,
         [f"input {r}/binary.jsonl:1 is not UTF-8 text (byte 0 of the file is 0x89)"]),
        ("preprocess-invalid-utf8-late", PREPROCESS, ["--input", f"{r}/late.txt", "--output-prefix", f"{r}/new/x",
                                                      "--tokenizer-model", tok], 2,
         [f"input {r}/late.txt:3001 is not UTF-8 text (byte 132003 of the file is 0xe9)", "--errors replace"]),
        ("preprocess-invalid-utf8-jsonl", PREPROCESS, ["--input", f"{r}/late.jsonl", "--output-prefix",
                                                       f"{r}/new/x", "--tokenizer-model", tok], 2,
         [f"input {r}/late.jsonl:1000 is not UTF-8 text"]),
        ("preprocess-key", PREPROCESS, ["--input", f"{r}/doc.jsonl", "--json-key", "body", "--output-prefix",
                                        f"{d}/x", "--tokenizer-model", tok], 2, ["no 'body' field"]),
        ("preprocess-existing", PREPROCESS, ["--input", f"{r}/doc.txt", "--output-prefix", f"{d}/good",
                                             "--tokenizer-model", tok], 2, ["already exists", "--overwrite"]),
        ("preprocess-tokenizer", PREPROCESS, ["--input", f"{r}/doc.txt", "--output-prefix", f"{r}/new/x",
                                              "--tokenizer-model", f"{r}/notsp.model"], 2,
         ["is not a sentencepiece model"]),
        ("preprocess-hf-neither", PREPROCESS, ["--input", f"{r}/doc.txt", "--output-prefix", f"{r}/new/x",
                                               "--tokenizer-model", f"{r}/empty"], 2,
         ["holding neither tokenizer.json"]),
        ("preprocess-hf-type", PREPROCESS, ["--input", f"{r}/doc.txt", "--output-prefix", f"{r}/new/x",
                                            "--tokenizer-model", f"{r}/hf-tok", "--tokenizer-type",
                                            "GPTSentencePieceTokenizer"], 2,
         ["is a Hugging Face tokenizer directory but --tokenizer-type is GPTSentencePieceTokenizer"]),
        ("preprocess-under-file", PREPROCESS, ["--input", f"{r}/doc.txt", "--output-prefix", f"{r}/afile/x",
                                               "--tokenizer-model", tok], 2, ["is a file"]),
        ("preprocess-workers", PREPROCESS, ["--input", f"{r}/doc.txt", "--output-prefix", f"{r}/new/x",
                                            "--tokenizer-model", tok, "--workers", "0"], 2, ["--workers 0"]),
        # train_tokenizer.py
        ("tokenizer-missing", TOKENIZER, ["--input", f"{r}/none.txt", "--model-prefix", f"{r}/new/t"], 2,
         ["does not exist"]),
        ("tokenizer-vocab", TOKENIZER, ["--input", f"{r}/doc.txt", "--model-prefix", f"{r}/new/t",
                                        "--vocab-size", "10"], 2, ["--vocab-size 10 is too small"]),
        ("tokenizer-existing", TOKENIZER, ["--input", f"{r}/doc.txt", "--model-prefix", f"{r}/tok"], 2,
         ["tok.model already exists"]),
        ("tokenizer-under-file", TOKENIZER, ["--input", f"{r}/doc.txt", "--model-prefix", f"{r}/afile/t"], 2,
         ["is a file"]),
        ("tokenizer-binary", TOKENIZER, ["--input", f"{r}/binary.txt", "--model-prefix", f"{r}/new/t"], 2,
         ["not UTF-8 text"]),
        ("tokenizer-invalid-utf8-late", TOKENIZER, ["--input", f"{r}/late.txt", "--model-prefix", f"{r}/new/t"], 2,
         [f"input {r}/late.txt:3001 is not UTF-8 text (byte 132003"]),
        ("tokenizer-bad-json-late", TOKENIZER, ["--input", f"{r}/late-json.jsonl", "--model-prefix", f"{r}/new/t"], 2,
         [f"{r}/late-json.jsonl:1000 is not valid JSON"]),
        ("tokenizer-usage", TOKENIZER, ["--model-prefix", f"{r}/new/t"], 2, ["one of the arguments"]),
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Files the cases point at: a tokenizer, good and damaged datasets, a checkpoint, plain files."""
    r = tmp_path_factory.mktemp("bad-input")
    docs = list(corpus.builtin_corpus_text())[:300]
    tk.train_tokenizer(docs, str(r / "tok"), 512)
    llama3_style_tokenizer(r / "hf-tok", docs)
    (r / "doc.txt").write_text("\n\n".join(docs[:20]))
    (r / "doc.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs[:20]))
    (r / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (r / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (r / "notsp.model").write_text("this is not a sentencepiece model\n")
    (r / "afile").write_text("a file where a directory is expected\n")
    (r / "empty").mkdir()
    (r / "out-existing").mkdir()
    (r / "out-existing" / "keep.txt").write_text("precious\n")
    data = r / "data"
    for name in ("good", "other", "truncated", "garbage", "short"):
        preprocess.preprocess_documents(preprocess.iter_documents([str(r / "doc.txt")], txt_mode="paragraph"),
                                        str(data / name), str(r / "tok.model"))
    index = (data / "truncated.idx").read_bytes()
    (data / "truncated.idx").write_bytes(index[: len(index) // 2])
    (data / "garbage.idx").write_bytes(os.urandom(len(index)))
    binary = (data / "short.bin").read_bytes()
    (data / "short.bin").write_bytes(binary[:-10])
    launch(run_worker, 1, [*RUN, "--save", str(r / "ckpt"), "--save-interval", "2"], timeout=600)
    filler = ("All work and no play makes Jack a dull boy.\n" * 3000).encode()  # 132 KB
    (r / "late.txt").write_bytes(filler + b"caf\xe9\n")
    lines = [json.dumps({"text": f"document {i}"}).encode() for i in range(1200)]
    (r / "late.jsonl").write_bytes(b"\n".join([*lines[:999], b'{"text": "\xc3\x28"}', *lines[1000:]]) + b"\n")
    (r / "late-json.jsonl").write_bytes(b"\n".join([*lines[:999], b'{"text": ', *lines[1000:]]) + b"\n")
    _damaged_copy(r / "ckpt", r / "ckpt-flipped", "optimizer.", _flip_middle)
    _damaged_copy(r / "ckpt", r / "ckpt-rows", "embedding.word_embeddings.weight", _replace_rows)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(r / "held")], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=path))  # another run, alive, holding --save
    assert holder.stdout.readline().strip() == "holding"
    full = _small_disk(r / "full", "3m")  # room for less than one checkpoint beside the one it holds
    if full:
        shutil.copytree(r / "ckpt", r / "full" / "ckpt")
    _broken_llamas(r)
    yield r
    holder.kill()
    holder.wait()
    if full:
        subprocess.run(["umount", str(r / "full")], check=True)


HOLD = """
import sys, time
from megatron_moh import save_dir
with save_dir.held(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(3600)
"""


def _small_disk(path: Path, size: str) -> bool:
    """Mount a ``size`` tmpfs at ``path`` (root only); whether it worked."""
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


def _damaged_copy(src: Path, dst: Path, item_name: str, damage) -> None:
    """A copy of the checkpoint ``src`` with the first data item whose name starts with
    ``item_name`` damaged in place by ``damage(data, item)``."""
    from torch.distributed.checkpoint import FileSystemReader

    shutil.copytree(src, dst)
    iteration = dst / "iter_0000002"
    storage = FileSystemReader(str(iteration)).read_metadata().storage_data
    item = min((info for index, info in storage.items() if index.fqn.startswith(item_name)),
               key=lambda info: (info.relative_path, info.offset))
    file = iteration / item.relative_path
    data = bytearray(file.read_bytes())
    damage(data, item)
    file.write_bytes(bytes(data))


def _flip_middle(data: bytearray, item) -> None:
    middle = item.offset + item.length // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])


def _replace_rows(data: bytearray, item) -> None:
    """Every row of the embedding (512 x 64) replaced with finite random floats."""
    tensor = torch.load(io.BytesIO(bytes(data[item.offset:item.offset + item.length])), weights_only=True)
    rows = tensor.numpy().tobytes()
    start = data.index(rows, item.offset)
    data[start:start + len(rows)] = torch.rand_like(tensor).numpy().tobytes()


def _broken_llamas(r: Path) -> None:
    """Llama checkpoints whose tensors do not fit their config: one of the wrong shape, one missing, one
    file cut short."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=32)
    shapes = {"model.embed_tokens.weight": (500, 64), "model.norm.weight": (64,), "lm_head.weight": (500, 64)}
    for i in range(2):
        for name, shape in (("input_layernorm", (64,)), ("post_attention_layernorm", (64,)),
                            ("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (64, 64)),
                            ("self_attn.v_proj", (64, 64)), ("self_attn.o_proj", (64, 64)),
                            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128))):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    state = {name: torch.zeros(shape) for name, shape in shapes.items()}
    broken = {"hf-shape": {**state, "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 64)},
              "hf-missing": {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
              "hf-damaged": state}
    for name, tensors in broken.items():
        config.save_pretrained(r / name)
        save_file(tensors, r / name / "model.safetensors", metadata={"format": "pt"})
    damaged = r / "hf-damaged" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])


@pytest.fixture(scope="module")
def results(root, tmp_path_factory):
    work = tmp_path_factory.mktemp("runner")
    table = [dict(id=c[0], prog=c[1], argv=c[2]) for c in cases(root)]
    (work / "cases.json").write_text(json.dumps(dict(root=str(root), cases=table)))
    runner = [sys.executable, str(ROOT / "tests/integration/bad_input_runner.py"), str(work / "cases.json"),
              str(work / "results.json")]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(runner, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "results.json").read_text())


def test_the_suite_is_large_enough(root):
    table = cases(root)
    assert len(table) >= 40 and len({c[0] for c in table}) == len(table)
    assert {c[1] for c in table} == {PRETRAIN, CONVERT, PREPROCESS, TOKENIZER}


@pytest.mark.parametrize("case", cases(Path("/ROOT")), ids=lambda c: c[0])
def test_bad_input_is_refused_in_one_line_before_any_work(case, results, root):
    case_id, prog, _, code, words = next(c for c in cases(root) if c[0] == case[0])
    got = results[case_id]
    message = got["stderr"].strip()
    if case_id == "resume-onto-full-disk" and not (root / "full" / "ckpt").exists():
        pytest.skip("needs root, to mount a small tmpfs")
    assert got["code"] == code, got
    assert "\n" not in message and message.startswith(prog) and ": error: " in message, message  # prog [command]
    assert "Traceback" not in got["stderr"]
    for word in words:
        assert word in message, (word, message)
    assert got["stdout"] == "", got["stdout"][-2000:]  # no megatron argument dump, no dataset building
    assert not got["process_group"]
    assert got["changed"] == [], got["changed"]  # nothing created, nothing the user had touched
