"""The official OpenAI Python SDK against the gateway example: what a user's code calls.

Run by `the_official_python_sdk_works_through_the_gateway` in tests/gateway_cli.rs, with the
gateway's base URL, a client key, and the key of a client allowed one request per minute; needs
`openai[realtime]` (the SDK and `websockets`). Any error answer makes the SDK raise, and the script
exit non-zero; on success it prints one JSON line that the test reads.
"""

import io
import json
import sys

import openai
from openai import AzureOpenAI, OpenAI

BATCH_INPUT = (
    b'{"custom_id":"1","method":"POST","url":"/chat/completions",'
    b'"body":{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}}\n'
)


def response_chain(client):
    """Five Responses turns chained by previous_response_id, then a streamed one; each answered
    by the instance of the first. Returns that instance's name."""
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Turn 1")
    home = raw.headers["x-served-by"]
    previous = raw.parse().id
    for turn in range(2, 6):
        raw = client.responses.with_raw_response.create(
            model="gpt-4o", input=f"Turn {turn}", previous_response_id=previous
        )
        assert raw.headers["x-served-by"] == home, (turn, raw.headers["x-served-by"], home)
        previous = raw.parse().id
    events = [
        event.type
        for event in client.responses.create(
            model="gpt-4o", input="Turn 6", previous_response_id=previous, stream=True
        )
    ]
    assert events[-1] == "response.completed", events
    assert client.responses.retrieve(previous).id == previous
    assert len(client.responses.input_items.list(previous).data) > 0
    return home


def conversation(client):
    """A conversation, three responses in it, then its items. Returns its instance."""
    raw = client.conversations.with_raw_response.create()
    home = raw.headers["x-served-by"]
    created = raw.parse()
    for turn in range(1, 4):
        raw = client.responses.with_raw_response.create(
            model="gpt-4o", input=f"Turn {turn}", conversation=created.id
        )
        assert raw.headers["x-served-by"] == home, (turn, raw.headers["x-served-by"], home)
    items = client.conversations.items.list(created.id)
    assert len(items.data) == 6, items
    return home


def thread(client):
    """An Assistants thread with a message, a run on it, then its messages. Returns its
    instance."""
    raw = client.beta.threads.with_raw_response.create(
        messages=[{"role": "user", "content": "Hello"}]
    )
    home = raw.headers["x-served-by"]
    created = raw.parse()
    raw = client.beta.threads.runs.with_raw_response.create(
        thread_id=created.id, assistant_id="asst_sdk"
    )
    assert raw.headers["x-served-by"] == home, (raw.headers["x-served-by"], home)
    run = client.beta.threads.runs.retrieve(run_id=raw.parse().id, thread_id=created.id)
    assert run.status == "completed", run
    messages = client.beta.threads.messages.list(thread_id=created.id)
    assert [m.role for m in messages.data] == ["assistant", "user"], messages
    return home


def file_and_batch(client):
    """A batch input file uploaded, then a batch made from it, then read back. Returns the
    instance that holds both."""
    raw = client.files.with_raw_response.create(
        file=("input.jsonl", io.BytesIO(BATCH_INPUT)), purpose="batch"
    )
    home = raw.headers["x-served-by"]
    uploaded = raw.parse()
    raw = client.batches.with_raw_response.create(
        input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h"
    )
    assert raw.headers["x-served-by"] == home, (raw.headers["x-served-by"], home)
    batch = raw.parse()
    assert client.batches.retrieve(batch.id).input_file_id == uploaded.id
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    return home


def chat_and_embeddings(client, embedding_model):
    """A chat completion, a stream that asks for usage, and embeddings."""
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello"}]
    )
    assert answer.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.total_tokens > 0, chunks[-1]
    vectors = client.embeddings.create(model=embedding_model, input=["a", "b"])
    assert len(vectors.data) == 2


def realtime(client):
    """A Realtime session over WebSocket: a text message, and the response to it, whole."""
    with client.realtime.connect(model="gpt-4o-realtime-preview") as session:
        assert session.recv().type == "session.created"
        session.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        session.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello"}],
            }
        )
        session.response.create()
        events = []
        for event in session:
            events.append(event.type)
            if event.type == "response.done":
                break
        assert "response.created" in events and any("delta" in e for e in events), events
        return len(events)


def errors(base, key, limited_key):
    """The gateway's own errors, raised by the SDK as the exceptions its users catch: a wrong
    key, a caller over its requests per minute (with the wait), a body over the limit."""

    def client(key):
        return AzureOpenAI(
            azure_endpoint=base, api_key=key, api_version="2024-10-21", max_retries=0
        )

    messages = [{"role": "user", "content": "Hello"}]
    try:
        client("not-a-client-key").chat.completions.create(model="gpt-4o", messages=messages)
        raise AssertionError("a wrong key was let through")
    except openai.AuthenticationError as error:
        assert error.status_code == 401, error
    limited = client(limited_key)
    limited.chat.completions.create(model="gpt-4o", messages=messages)
    try:
        limited.chat.completions.create(model="gpt-4o", messages=messages)
        raise AssertionError("a caller over its limit was let through")
    except openai.RateLimitError as error:
        assert error.code == "429", error
        assert int(error.response.headers["retry-after"]) > 0, error.response.headers
    huge = [{"role": "user", "content": "x" * (17 << 20)}]
    try:
        client(key).chat.completions.create(model="gpt-4o", messages=huge)
        raise AssertionError("a body over the limit was let through")
    except openai.APIStatusError as error:
        assert error.status_code == 413, error
        assert error.code == "request_body_too_large", error


def main():
    base, key, limited_key = sys.argv[1:4]
    websocket = base.replace("http://", "ws://", 1)
    clients = {
        "azure": AzureOpenAI(
            azure_endpoint=base,
            api_key=key,
            api_version="2025-04-01-preview",
            websocket_base_url=f"{websocket}/openai",
        ),
        "v1": OpenAI(
            base_url=f"{base}/openai/v1/",
            api_key=key,
            websocket_base_url=f"{websocket}/openai/v1",
        ),
    }
    errors(base, key, limited_key)
    summary = {}
    for name, client in clients.items():
        chat_and_embeddings(client, "text-embedding-3-small")
        summary[name] = {
            "response_chain": response_chain(client),
            "conversation": conversation(client),
            "thread": thread(client),
            "file_and_batch": file_and_batch(client),
            "realtime_events": realtime(client),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
