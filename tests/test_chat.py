"""``fmforge chat``: the run's chat template applied, replies streamed, history trimmed to the context,
/reset and /exit, Ctrl-C stops the reply and not the session — driven through a pseudo-terminal — and
``generate --chat`` for one message."""

import io
import sys

import pytest

from fmforge.deploy.batching import Engine, SamplingParams
from fmforge.deploy.chat import ChatSession, chat_prompt_ids, generate_chat, trimmed_prompt
from fmforge.deploy.generate import sample
from fmforge.errors import FmforgeError
from fmforge.runs import load_pretrained

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def loaded(chat_base):
    return load_pretrained(chat_base, "cpu", family="decoder")


def greedy_reply(model, tok, messages, max_new_tokens=20) -> str:
    ids = chat_prompt_ids(tok, messages)
    return tok.decode(sample(model, ids, max_new_tokens, temperature=0, eos_id=tok.eos_id, vocab_limit=tok.vocab_size))


def test_generate_chat_answers_one_message_through_the_template(chat_base, loaded):
    model, tok = loaded
    reply = generate_chat(chat_base, "What is a list?", system="Be brief.", max_new_tokens=20, temperature=0,
                          device="cpu")
    assert reply == greedy_reply(model, tok, [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "What is a list?"}])
    with pytest.raises(FmforgeError, match="empty message"):
        generate_chat(chat_base, "", device="cpu")


def test_history_is_trimmed_from_the_oldest_turn_to_fit_the_context(loaded):
    _, tok = loaded
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} about json"},
                    {"role": "assistant", "content": f"answer {i} is here"}]
    history.append({"role": "user", "content": "last question"})
    ids, kept = trimmed_prompt(tok, "sys", history, context=64, reserve=16)
    assert len(ids) + 16 <= 64 and kept[-1] == history[-1] and len(kept) < len(history)
    assert kept == history[-len(kept):] and kept[0]["role"] == "user"
    assert tok.decode(ids).startswith("sys\n\n")
    with pytest.raises(FmforgeError, match="shorten it"):
        trimmed_prompt(tok, None, [{"role": "user", "content": "word " * 100}], context=64, reserve=16)


class _InterruptAfter(io.StringIO):
    """A terminal whose user presses Ctrl-C once ``n`` pieces of the reply have been written."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, text):
        if self.n == 0:
            self.n = -1
            raise KeyboardInterrupt
        self.n -= 1
        return super().write(text)


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(loaded):
    model, tok = loaded
    engine = Engine(model, tok.eos_id, tok.vocab_size, max_running=1, max_waiting=1).start()
    try:
        session = ChatSession(engine, tok, 64, None, SamplingParams(max_tokens=30, temperature=0))
        out = _InterruptAfter(2)
        partial = session.reply("hello there", out)
        full = greedy_reply(model, tok, [{"role": "user", "content": "hello there"}], 30)
        assert "[stopped]" in out.getvalue() and full.startswith(partial) and len(partial) < len(full)
        assert session.history[-1] == {"role": "assistant", "content": partial or " "}
        # the next turn sees the (interrupted) exchange
        second = session.reply("and then?", io.StringIO())
        assert second == greedy_reply(model, tok, session.history[:-1], 30)
        session.reset()
        assert session.history == []
    finally:
        engine.stop(10)


@pytest.mark.slow
def test_interactive_chat_in_a_pseudo_terminal(chat_base, loaded):
    model, tok = loaded
    code = (f"from fmforge.deploy.chat import chat; chat({str(chat_base)!r}, system='Be brief.', "
            "max_new_tokens=20, temperature=0, device='cpu')")
    child = pexpect.spawn(sys.executable, ["-c", code], encoding="utf-8", timeout=120, dimensions=(50, 200))
    try:
        child.expect(">>> ")
        assert "/reset" in child.before
        child.sendline("What is a dict?")
        child.expect(">>> ")
        first = greedy_reply(model, tok, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "What is a dict?"}])
        assert first.strip().replace("\n", "\r\n") in child.before
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not the end
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect(">>> ")
        child.sendline("/nonsense")
        child.expect("unknown command")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
