"""Book mode (`book_compat: true`) against the book's own functions from the installed `llms_from_scratch`
package, on the same inputs: appendix D's warmup from initial_lr with clipping only after the warmup
(per-step learning rates, and a whole training loop); appendix E's LoRA (a layer's output, separate Q/K/V
adapters on the fused qkv, the trainable parameter count of 124M + a 2-class head at rank 16).

Run: python -m pytest -x -q tests/test_book.py
"""
from __future__ import annotations

import json

import pytest
import torch

from llm.shards import TokenWindows, read_tokens
from llm.train import lr_at, run_pretrain
from test_train import TINY, tiny_cfg, write_shards


def test_appendix_d_learning_rates_per_step():
    """Our book-mode schedule equals appendix D's formula at every step; the default warmup stays ours."""
    cfg = tiny_cfg(book_compat=True, lr=4e-4, initial_lr=3e-5, min_lr=1e-6, warmup_steps=4)
    total = 20
    inc = (4e-4 - 3e-5) / 4
    ours = [lr_at(s, cfg, total) for s in range(total)]
    assert ours[:4] == [3e-5 + s * inc for s in range(4)]
    assert ours[0] == 3e-5 and ours[4] == pytest.approx(4e-4, abs=1e-18)
    default = tiny_cfg(lr=4e-4, warmup_steps=4)
    assert [lr_at(s, default, total) for s in range(4)] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4], abs=1e-18)


def test_appendix_d_training_loop_replayed_within_1e6(tmp_path):
    """llms_from_scratch.appendix_d.train_model (warmup from initial_lr, cosine to min_lr, clipping from the
    end of the warmup) and run_pretrain(book_compat) give the same learning rates and the same losses."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    app_d = pytest.importorskip("llms_from_scratch.appendix_d")
    from llm.tokenizer import get_encoding

    cfg = tiny_cfg(book_compat=True, epochs=2, batch_size=2, lr=4e-3, initial_lr=3e-5, min_lr=1e-6,
                   weight_decay=0.1, schedule="cosine", warmup_steps=6, grad_clip=1.0, betas=(0.9, 0.999),
                   eval_every=5, eval_batches=5, checkpoint_every=1000, seed=123, dtype="float32")
    shards = write_shards(tmp_path / "corpus", {"s": 600}, seed=3)  # ~40 windows: 2 epochs of ~20 steps
    ctx = TINY["context_length"]
    train = TokenWindows(read_tokens(shards, "train"), ctx, ctx)
    val = TokenWindows(read_tokens(shards, "val"), ctx, ctx)
    torch.manual_seed(123)
    book = ch04.GPTModel(dict(TINY))
    opt = torch.optim.AdamW(book.parameters(), lr=4e-3, weight_decay=0.1)
    train_loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=2, shuffle=False, drop_last=False)
    torch.set_num_threads(1)
    book_train, book_val, book_tokens, book_lrs = app_d.train_model(
        book, train_loader, val_loader, opt, "cpu", n_epochs=2, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=get_encoding(), warmup_steps=6, initial_lr=3e-5,
        min_lr=1e-6)

    total = len(train_loader) * 2
    assert [lr_at(s, cfg, total) for s in range(total)] == pytest.approx(book_lrs, abs=1e-12)
    run_pretrain(cfg, shards, tmp_path / "ours", progress=False)
    hist = json.loads((tmp_path / "ours" / "history.json").read_text())
    assert hist["tokens_seen"] == book_tokens
    assert hist["train_loss"] == pytest.approx(book_train, abs=1e-6)
    assert hist["val_loss"] == pytest.approx(book_val, abs=1e-6)


# ------------------------------------------------------------------ appendix E: LoRA

def test_appendix_e_lora_layer_output_equals_the_books():
    app_e = pytest.importorskip("llms_from_scratch.appendix_e")
    from llm.lora import LoRALinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    ours = LoRALinear(lin, rank=4, alpha=8.0, book=True)
    book = app_e.LinearWithLoRA(lin, rank=4, alpha=8.0)
    with torch.no_grad():
        book.lora.A.copy_(torch.randn(12, 4))
        book.lora.B.copy_(torch.randn(4, 5))
        ours.A.copy_(book.lora.A)
        ours.B.copy_(book.lora.B)
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(ours(x), book(x), rtol=0, atol=1e-6)
    default = LoRALinear(lin, rank=4, alpha=8.0)  # llmpipe's default: alpha / rank
    assert default.scaling == 2.0 and ours.scaling == 8.0
    # the book's A init: kaiming uniform per (in, rank) matrix, B zeros: a fresh wrapper changes nothing
    assert torch.equal(LoRALinear(lin, 4, 8.0, book=True, parts=5)(x), lin(x))


def test_appendix_e_separate_qkv_adapters_equal_three_book_layers():
    """A fused qkv with parts=3 computes what the book's W_query, W_key, W_value LinearWithLoRA layers do."""
    app_e = pytest.importorskip("llms_from_scratch.appendix_e")
    from llm.lora import LoRALinear, merge_lora

    torch.manual_seed(1)
    d, r = 8, 2
    qkv = torch.nn.Linear(d, 3 * d, bias=False)
    ours = LoRALinear(qkv, rank=r, alpha=16.0, book=True, parts=3)
    books = []
    for i in range(3):
        lin = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(qkv.weight[i * d:(i + 1) * d])
        b = app_e.LinearWithLoRA(lin, r, 16.0)
        with torch.no_grad():
            b.lora.A.copy_(torch.randn(d, r))
            b.lora.B.copy_(torch.randn(r, d))
            ours.A[i].copy_(b.lora.A)
            ours.B[i].copy_(b.lora.B)
        books.append(b)
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(ours(x), torch.cat([b(x) for b in books], dim=-1), rtol=0, atol=1e-5)
    merged = merge_lora(torch.nn.Sequential(ours))[0]
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-5)  # values ~100: float32 rounding


def test_appendix_e_trainable_count_124m_with_2_class_head():
    """The book's replace_linear_with_lora on its 124M GPTModel + Linear(768, 2) head, and llmpipe's book-mode
    apply_lora on the same architecture: 2,666,528 trainable parameters at rank 16 (fused: 2,371,616)."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    app_e = pytest.importorskip("llms_from_scratch.appendix_e")
    from llm.model import GPT, GPTConfig
    from llm.spam import add_classification_head, set_train_mode

    cfg = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.0,
               qkv_bias=True)
    book = ch04.GPTModel(cfg)
    book.out_head = torch.nn.Linear(768, 2)
    for p in book.parameters():
        p.requires_grad = False
    app_e.replace_linear_with_lora(book, rank=16, alpha=16)
    book_count = sum(p.numel() for p in book.parameters() if p.requires_grad)
    del book

    def ours(book_mode: bool) -> int:
        model = add_classification_head(GPT(GPTConfig(**cfg, tie_weights=False)), 2)
        set_train_mode(model, "lora", 16, 16.0, ["att", "ff", "out_head"], book=book_mode)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert book_count == ours(True) == 2_666_528
    assert ours(False) == 2_371_616


# ------------------------------------------------------------------ chapter 6

def _sms_file(tmp_path):
    """An SMS file with a stray quote that pandas' default quoting merges across lines, as in the real data."""
    lines = []
    for i in range(40):
        lines.append(f"spam\tWIN a prize {i}! call 0800 now" if i % 4 == 0 else f"ham\tsee you at {i} o'clock")
    lines[5] = 'ham\t"Quoted start, ok'  # opens a quoted field: the lines up to the closing quote join it
    lines[8] = 'ham\tthe end of it"'
    p = tmp_path / "SMSSpamCollection"
    p.write_text("\n".join(lines))
    return p


def test_ch06_book_parse_and_split_row_for_row(tmp_path):
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    import pandas as pd

    from llm.spam import balance_and_split, read_sms_collection, read_sms_pandas

    f = _sms_file(tmp_path)
    df = pd.read_csv(f, sep="\t", header=None, names=["Label", "Text"])
    book_train, book_val, book_test = ch06.random_split(ch06.create_balanced_dataset(df), 0.7, 0.1)
    data = read_sms_pandas(f)
    assert len(data.texts) == len(df) < len(read_sms_collection(f).texts)  # merged lines, as the book reads
    ours = balance_and_split(data.texts, data.labels, seed=123)
    for mine, book in zip(ours, (book_train, book_val, book_test)):
        assert mine["text"].tolist() == book["Text"].tolist()
        assert mine["label"].tolist() == [("ham", "spam").index(x) for x in book["Label"]]


def test_ch06_book_readout_at_minus_one_equals_the_books_logits():
    """Book mode pads every message to L and reads position -1: the book's model(x)[:, -1, :]."""
    from llm.model import GPT, GPTConfig
    from llm.spam import Batches, add_classification_head, classify_logits

    torch.manual_seed(0)
    net = add_classification_head(GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2,
                                                n_layers=1)), 2).eval()
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    ids, lengths, _ = Batches(seqs, [0, 1, 0], 3, pad_to=8).batch([0, 1, 2], 0)
    assert ids.shape == (3, 8) and lengths.tolist() == [8, 8, 8]
    with torch.no_grad():
        book = net(ids)[:, -1, :]
        torch.testing.assert_close(classify_logits(net, ids, lengths), book, rtol=0, atol=1e-6)
        ids2, lengths2, _ = Batches(seqs, [0, 1, 0], 3).batch([0, 1, 2], 0)  # llmpipe: the true last token
        assert lengths2.tolist() == [3, 6, 1] and not torch.allclose(classify_logits(net, ids2, lengths2), book)


def test_ch06_real_file_gives_the_books_5572_rows():
    from pathlib import Path

    from llm.spam import read_sms_collection, read_sms_pandas

    f = Path("/work/shared/data/SMSSpamCollection")
    if not f.is_file():
        pytest.skip("the shared data mirror is not on this machine")
    data = read_sms_pandas(f)
    assert (len(data.texts), data.labels.count(0), data.labels.count(1)) == (5572, 4825, 747)
    assert len(read_sms_collection(f).texts) == 5574


# ------------------------------------------------------------------ chapter 7

CH07_RECORDS = [
    {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
     "output": "The correct spelling is 'Occasion.'"},
    {"instruction": "What is an antonym of 'complicated'?", "input": "", "output": "An antonym is 'simple'."},
]


def test_ch07_prompt_and_collate_equal_the_books():
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    from llm.instruct import collate, encode_examples
    from llm.prompts import format_input
    from llm.tokenizer import get_encoding

    enc = get_encoding()
    for r in CH07_RECORDS:
        assert format_input(r) == ch07.format_input(r)  # book mode prompts with exactly this text
    ours_ids, _ = encode_examples(enc, CH07_RECORDS, "alpaca")
    assert ours_ids == ch07.InstructionDataset(CH07_RECORDS, enc).encoded_texts
    for max_len in (None, 20):
        x, y = collate(ours_ids, allowed_max_length=max_len)
        bx, by = ch07.custom_collate_fn(ours_ids, allowed_max_length=max_len)
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_ch07_book_responses_equal_the_books_generate_and_strip():
    """respond(book=True): the book's ch05 generate on format_input(entry) (sliding window past the context),
    then generated_text[len(input_text):].replace("### Response:", "").strip()."""
    ch05 = pytest.importorskip("llms_from_scratch.ch05")
    from llm.instruct import respond
    from llm.model import GPT, GPTConfig
    from llm.prompts import format_input
    from llm.tokenizer import get_encoding

    enc = get_encoding()
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=50257, context_length=48, emb_dim=16, n_heads=2, n_layers=1)).eval()
    for r, n in ((CH07_RECORDS[1], 8), (CH07_RECORDS[0], 30)):  # the second runs past the 48-token context
        text = format_input(r)
        ids = ch05.generate(model, ch05.text_to_token_ids(text, enc), n, context_size=48, eos_id=50256)
        book = ch05.token_ids_to_text(ids, enc)[len(text):].replace("### Response:", "").strip()
        assert respond(model, enc, r, "alpaca", n, book=True) == book
    assert len(enc.encode(format_input(CH07_RECORDS[0]))) + 30 > 48


def test_ch07_book_mode_decays_every_parameter():
    from llm.config import InstructConfig
    from llm.instruct import make_optimizer
    from llm.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=100, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    n = sum(1 for _ in model.parameters())
    book = make_optimizer(model, InstructConfig(book_compat=True)).param_groups
    assert len(book) == 1 and len(book[0]["params"]) == n and book[0]["weight_decay"] == 0.1
    ours = make_optimizer(model, InstructConfig()).param_groups
    assert [g["weight_decay"] for g in ours] == [0.1, 0.0]


# ------------------------------------------------------------------ presets that replay the book

def test_book_presets_load_with_book_mode_on():
    from flows.stages import plan
    from llm.config import load_config

    spam = load_config("spam-book")
    assert spam.spam.book_compat and spam.spam.init == "gpt2" and spam.spam.train_mode == "last_block"
    assert (spam.spam.epochs, spam.spam.batch_size, spam.spam.lr, spam.spam.weight_decay) == (5, 8, 5e-5, 0.1)
    assert plan(spam, ["spam"]) == ["download", "spam"]  # no pretraining: GPT-2's weights
    inst = load_config("instruct-book")
    assert inst.instruct.book_compat and inst.instruct.init == "gpt2-medium" and not inst.instruct.mask_prompt
    assert (inst.instruct.epochs, inst.instruct.lr, inst.instruct.max_new_tokens) == (2, 5e-5, 256)
    assert (inst.dpo.beta, inst.dpo.lr, inst.dpo.max_new_tokens) == (0.1, 5e-6, 256)
    assert inst.judge.prompt == "book"
    assert plan(inst, ["judge"]) == ["download", "instruct", "dpo", "judge"]


# ------------------------------------------------------------------ the judge: the book's client against Ollama

class OllamaStandIn:
    """A real HTTP server on 127.0.0.1 speaking Ollama's native API: GET /api/version, POST /api/chat streaming
    one JSON object per line (as Ollama does without "stream": false); the score is split over two chunks."""

    def __init__(self, answer: str = "87"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, data: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/api/version":
                    return self._send(200, b'{"version": "0.5.7"}')
                self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                outer.bodies.append(body)
                if self.path != "/api/chat":
                    return self._send(404, b'{"error": "not found"}')
                chunks = [answer[:1], answer[1:]]
                lines = [json.dumps({"model": body["model"], "message": {"role": "assistant", "content": c},
                                     "done": False}) for c in chunks]
                lines.append(json.dumps({"model": body["model"], "message": {"role": "assistant", "content": ""},
                                         "done": True}))
                self._send(200, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_judge_book_prompt_speaks_ollamas_native_api_as_the_book(tmp_path):
    """prompt=book with an Ollama URL (its /v1 included): the same request body as the book's own
    ch07.query_model sends, to /api/chat, the streamed answer joined and parsed."""
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    import pandas as pd

    from llm.config import JudgeConfig
    from llm.judge import run_judge
    from llm.judge.prompts import book_prompt
    from llm.judge.remote import OllamaJudge
    from llm.judge.stage import make_judge

    rec = {"instruction": "What is the capital of France?", "input": "", "output": "Paris.", "response": "Paris"}
    responses = tmp_path / "r.parquet"
    pd.DataFrame([rec]).to_parquet(responses)
    with OllamaStandIn("87") as srv:
        cfg = JudgeConfig(url=srv.root + "/v1", model="llama3", prompt="book", calibration_sample=0)
        assert isinstance(make_judge(cfg), OllamaJudge)
        res = run_judge(cfg, responses, tmp_path / "out", progress=False)
        assert res.metrics["judge_mean_score"] == 87.0
        assert ch07.query_model(book_prompt(rec, "Paris"), "llama3", srv.root + "/api/chat") == "87"
        ours, book = srv.bodies
    assert ours == book == {"model": "llama3", "messages": [{"role": "user", "content": book_prompt(rec, "Paris")}],
                            "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    # a /v1 server that is not Ollama keeps the OpenAI-compatible client
    from llm.judge.remote import RemoteJudge

    j = make_judge(JudgeConfig(url="http://127.0.0.1:9/v1", model="m", prompt="book", timeout=1))
    assert type(j) is RemoteJudge
    j.close()
