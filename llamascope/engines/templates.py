"""Chat templates for Llama 3.2 Vision.

``STOCK_TEMPLATE`` is Meta's Llama-3.2-Vision-Instruct template. It is what the
built-in test model ships with, so that it reads like real weights.

Tools (``apply_chat_template(..., tools=[...])``, OpenAI-shaped) go where Meta's
template puts them: "Environment: ipython" in the system turn (which a
conversation with an image has not) and the JSON tool-call instruction with the
function definitions at the head of the first user message. Unlike Meta's, that
message keeps its image (Meta's trims its content as a string). Tool results
come as "ipython" turns and earlier calls as the assistant's text (the engine
writes both so), which the ordinary branch renders as Meta's template does.

``LLAMASCOPE_TEMPLATE`` is what llamascope renders prompts with. It differs
from the stock one in one place only: a system message together with an image
becomes an ordinary system turn instead of an exception ("Prompting with images
is incompatible with system messages."), because the DashScope API allows a
system message in every conversation and every conversation here has an image.
For any conversation the stock template accepts, both render the same string
(``tests/engines/test_templates.py`` checks it).

``TEXT_TEMPLATE`` is the Llama 3 text models' template (Llama 3.2 1B/3B-Instruct's),
which the built-in text-only test model ships with: a conversation without
images, rendered as the stock template renders one.

``turn_specials`` and ``renders_every_text`` probe any template (a configured one too) once, at load: how many
special tokens it writes for each turn, and whether it writes every turn's text; the engine's cheap lower
bound on a prompt's tokens (``in_process``) rests on them.
"""

from __future__ import annotations

import re
from typing import Any

from llamascope.structured.tools import TOOL_RESULT_ROLE

_HEAD = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- if message['content'] is not string %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {%- set image_ns.has_images = true %}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endfor %}
"""

_STOCK_SYSTEM = r"""
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}
"""

_LLAMASCOPE_SYSTEM = r"""
{%- if image_ns.has_images and not system_message == "" %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" + system_message + "<|eot_id|>" }}
{%- endif %}
"""

_BODY = r"""
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a " }}
        {{- "function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}
{%- if tools_in_user_message and tools is not none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content'] %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {%- if first_user_message is string %}
        {{- first_user_message | trim }}
    {%- else %}
        {%- for content in first_user_message %}
            {%- if content['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif content['type'] == 'text' %}
                {{- content['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif content['type'] == 'text' %}
                {{- content['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

STOCK_TEMPLATE = _HEAD + _STOCK_SYSTEM + _BODY
LLAMASCOPE_TEMPLATE = _HEAD + _LLAMASCOPE_SYSTEM + _BODY
TEXT_TEMPLATE = _HEAD + _BODY  # with no image in any message, _HEAD only sets the system message


CHAT_ROLES = ("system", "user", "assistant", TOOL_RESULT_ROLE)  # what ``in_process.chat_role`` gives


def turn_specials(tokenizer: Any, template: str, specials: re.Pattern[str] | None) -> int:
    """The fewest special tokens (one token each) ``template`` writes for one more turn, whatever its role: 3 in
    Llama 3's (the role's header, the turn's end); 0 where it cannot tell (a role it refuses there)."""

    def count(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        return len(specials.findall(text)) if specials is not None else 0

    first = [{"role": "user", "content": "a"}]
    try:
        return max(0, min(count([*first, {"role": role, "content": "a"}]) for role in CHAT_ROLES) - count(first))
    except Exception:  # a template that refuses a role there (raise_exception, or any error of its own)
        return 0


def renders_every_text(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` writes every turn's text into the prompt (Meta's templates do), each role's and each
    turn's of a conversation: only then is a conversation's text a bound on its prompt's."""
    probes = [f"llamascope probe {i}" for i in range(len(CHAT_ROLES) + 1)]
    roles = ["user", *CHAT_ROLES]  # each role once after a first user turn
    messages = [{"role": role, "content": probe} for role, probe in zip(roles, probes, strict=True)]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # a template that refuses a role there: the turns are not all written
        return False
    return all(probe in text for probe in probes)
