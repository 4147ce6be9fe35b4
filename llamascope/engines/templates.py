"""Chat templates for Llama 3.2 Vision.

``STOCK_TEMPLATE`` is Meta's Llama-3.2-Vision-Instruct template (tool-calling
branches left out: these models take no tools on DashScope). It is what the
built-in test model ships with, so that it reads like real weights.

``LLAMASCOPE_TEMPLATE`` is what llamascope renders prompts with. It differs
from the stock one in one place only: a system message together with an image
becomes an ordinary system turn instead of an exception ("Prompting with images
is incompatible with system messages."), because the DashScope API allows a
system message in every conversation and every conversation here has an image.
For any conversation the stock template accepts, both render the same string
(``tests/engines/test_templates.py`` checks it).

``TEXT_TEMPLATE`` is the Llama 3 text models' template (Llama 3.2 1B/3B-Instruct's,
tool-calling branches left out), which the built-in text-only test model ships
with: a conversation without images, rendered as the stock template renders one.
"""

_HEAD = r"""{{- bos_token }}
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
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {{- system_message }}
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
