"""Drive a live bitnet-gateway with the official `openai` Python SDK.

Usage: python3 openai_python.py BASE_URL [MODEL]

BASE_URL ends in /v1 (e.g. http://127.0.0.1:8090/v1); MODEL defaults to falcon3-10b. Makes a
non-streamed chat call, a streamed one, and lists the models, checking each answer the way an
application relies on it. Exits 0 when all hold; otherwise prints what failed and exits 1.
"""

import sys

from openai import OpenAI

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def check(condition, message):
    if not condition:
        print(f"openai_python: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base_url = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) == 3 else "falcon3-10b"
    # No retries: a failure must show, not be papered over by a second attempt.
    client = OpenAI(base_url=base_url, api_key="bitnet-local", max_retries=0, timeout=120)

    # Greedy decoding: the same answer every run, so a pass or a failure repeats.
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0
    )
    check(reply.object == "chat.completion", f"non-stream object is {reply.object!r}")
    check(len(reply.choices) == 1, f"non-stream has {len(reply.choices)} choices")
    choice = reply.choices[0]
    check(isinstance(choice.message.content, str), "non-stream content is not a string")
    check(choice.message.role == "assistant", f"non-stream role is {choice.message.role!r}")
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    check(reply.usage is not None and reply.usage.completion_tokens > 0, f"usage {reply.usage!r}")

    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, text, finish, usage = 0, "", None, None
    for chunk in stream:
        chunks += 1
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    check(chunks >= 2, f"stream had {chunks} chunks")
    check(text != "", "stream carried no content")
    check(finish in ("stop", "length"), f"stream finish_reason {finish!r}")
    check(usage is not None and usage.completion_tokens > 0, f"stream usage {usage!r}")

    ids = [m.id for m in client.models.list()]
    check(model in ids, f"{model!r} not in the model list {ids}")

    print(f"openai_python: ok (non-stream, {chunks} stream chunks, models {ids})")


if __name__ == "__main__":
    main()
