"""The example graph of docs/ai.md ("A graph over the bus"), kept identical to it by a test."""

from __future__ import annotations

from typing import Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from nexus_bus.ai.graphs import GraphRegistry, bus_of

graphs = GraphRegistry()


class Answer(TypedDict, total=False):
    key: str  # the data key holding the document
    question: str
    document: Any
    answer: str


async def fetch(state: Answer, config: RunnableConfig) -> Answer:
    """Read the document with `data.get`, as the caller."""
    reply = await bus_of(config).call("data", "get", {"key": state["key"]})
    return {"document": reply["value"]}


async def answer(state: Answer, config: RunnableConfig) -> Answer:
    """Ask the model about it with `ai.complete`."""
    prompt = f"Document: {state['document']}\nQuestion: {state['question']}"
    reply = await bus_of(config).call("ai", "complete", {"prompt": prompt, "max_tokens": 64})
    return {"answer": reply["text"]}


@graphs.graph("answer")
def build_answer() -> Any:
    """data.get, then ai.complete."""
    builder = StateGraph(Answer)
    builder.add_node("fetch", fetch)
    builder.add_node("answer", answer)
    builder.add_edge(START, "fetch")
    builder.add_edge("fetch", "answer")
    builder.add_edge("answer", END)
    return builder.compile()
