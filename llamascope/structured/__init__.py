"""Structured output: JSON mode, JSON Schema and tool calls, held by constrained decoding.

The shape follows vLLM's ``v1/structured_output``: an abstract backend and grammar, one module for the library.

- ``spec``: what a request asks. ``read_request(response_format=..., tools=..., tool_choice=...,
  parallel_tool_calls=..., message_texts=..., prefix=...)`` checks the wire fields and returns an ``OutputSpec``, or
  raises ``ServiceError`` 400 ``InvalidParameter`` naming the field (a schema llguidance cannot compile, no "json"
  in the messages for ``json_object``, tool parameters that are not a JSON Schema object, ``tool_choice`` naming an
  unknown function). ``OutputSpec.grammar()`` is the ``GrammarSpec`` that constrains decoding, or None. Needs no
  model, no torch: the API layer calls it before queueing.
- ``backend``: the interface (``Backend``, ``Grammar``, ``Matcher``); ``guidance``: its llguidance implementation,
  ``GuidanceBackend.from_model_dir(dir)`` or ``GuidanceBackend(tokenizer_json, vocab_size=, stop_ids=)``.
- ``compiler``: ``GrammarCache(backend, capacity)``, grammars compiled once per ``GrammarSpec.key`` (a SHA-256 of
  kind and schema text) on a worker thread, least recently used dropped; ``await cache.get(spec)``.
- ``masking`` (the one module importing torch): ``StepMasks`` fills one bitmask for a step's constrained rows and
  applies it to just those rows' logits; ``StepMasks.advance`` gives each matcher its token.
- ``tools``: Llama 3.1 JSON tool calls (``{"name": ..., "parameters": {...}}``, several joined by "; "):
  ``parse_answer`` (vLLM's ``llama3_json`` rules), OpenAI-shaped ``ToolCall.to_openai``, ``CallStream`` for
  streams, and ``tools_prompt`` / ``call_text`` / ``TOOL_RESULT_ROLE`` for the prompt.

Integration (phase two)
-----------------------
API layer (all three surfaces): call ``read_request`` with the fields (DashScope native: from ``parameters``,
``prefix="parameters."``; compatible mode: from the body) and every message's text; put the ``OutputSpec`` on the
conversation request. The messages: ``role: tool`` becomes a ``TOOL_RESULT_ROLE`` ("ipython") turn with its
content; an assistant message's ``tool_calls`` becomes its content ``call_text(tool_calls)``; with
``spec.offered_tools()`` non-empty the template gets Meta's tool branches (``tools_prompt`` before the first user
message, "Environment: ipython" in the system turn). An upstream engine gets the fields passed on unchanged.

Engine, at admission: ``grammar = await cache.get(spec.grammar())`` (the request waits, the loop does not) and
``seq.matcher = grammar.matcher()``; one ``GuidanceBackend`` and one ``GrammarCache`` per loaded model, built from
the model directory (``vocab_size`` from the output layer, 128,256 for Llama 3.2 Vision whose tokenizer has
128,257 ids; stop ids from the generation config).

Engine, every decode step (``engines/scheduler.py``, in ``_pick``): ``filled = masks.fill(matchers)`` (may run
on a thread while the forward pass runs: llguidance drops the GIL), then ``masks.apply(logits, filled)`` after
``_hold_back_eos`` and after ``log_probabilities`` (logprobs stay the model's own, as vLLM reports them) and
before ``pick`` (so temperature, top-k, top-p and the repetition penalty see only allowed tokens); then
``ends = masks.advance(matchers, tokens)``: a row whose ``ends[i]`` is True is finished now ("stop", or
"tool_calls" when its answer parses as calls). A grammar-complete row must end even if ``min_new_tokens`` is not
reached (its mask would otherwise allow only the held-back stop tokens). The first step (prefill's pick) is
masked the same way.

Answer: with ``spec.calls_tools``, ``parse_answer(text, spec.tools)``: calls replace the text, ``finish_reason``
becomes "tool_calls"; an answer of calls cut by ``length`` keeps its whole calls, drops the one cut and
stays "length" (``parse_answer(..., cut=True)``), never the raw format as text. Streaming: ``CallStream(tools,
forced=spec.forces_tool_call)``: each ``push(delta)`` returns the text to send; ``finish()`` returns the held-back
text and the calls, sent as one delta each: OpenAI ``choices[0].delta.tool_calls = [call.to_openai(index=i)]``;
DashScope incremental the same under ``output.choices[0].message.tool_calls``, cumulative the full list. JSON
answers stream as ordinary text.
"""
