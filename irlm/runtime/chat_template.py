"""Rendering a chat template (jinja2) the way Hugging Face does, at a bounded cost.

A chat template ships inside a model or an engine (tokenizer_config.json), so it is input, not
code: it renders in jinja2's immutable sandbox (no attribute access to internals, no mutation
of the messages), and within a budget:

* a wall-clock budget (:data:`TIME_BUDGET_S`), checked at every output chunk and every
  ``range`` iteration, so nested loops cannot spin for long;
* an output budget (:data:`MAX_OUTPUT_CHARS`), and ``*`` / ``**`` whose result would be huge
  (``"x" * 10**10``) are refused before they allocate.

Every failure (syntax error, sandbox violation, ``raise_exception`` in the template, budget
exceeded) is one :class:`ChatTemplateError` line.
"""
from __future__ import annotations

import time

from ..errors import IRLMError

#: seconds a template may take to render
TIME_BUDGET_S = 2.0
#: characters a rendered prompt may have
MAX_OUTPUT_CHARS = 4 << 20
_MAX_OPERAND = 1 << 20          # bound on the size of a repeated sequence or an exponent


class ChatTemplateError(IRLMError):
    """A chat template that cannot be rendered; the message says why."""


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         tokenizer=None, *, time_budget_s: float = TIME_BUDGET_S) -> str:
    """Render ``template`` over ``messages`` (sandboxed, trimmed blocks, like HF)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    deadline = time.monotonic() + time_budget_s

    def check_time():
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"chat template: rendering took longer than its "
                                    f"{time_budget_s:g} s budget (a runaway loop?)")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and \
                    isinstance(left, int) and abs(left) > 1:
                raise ChatTemplateError(f"chat template: {left} ** {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                            len(seq) * n > MAX_OUTPUT_CHARS:
                        raise ChatTemplateError(f"chat template: a repetition of "
                                                f"{len(seq) * n} items is too large")
            return super().call_binop(context, operator, left, right)

    class TimedRange:
        """The sandbox's range (its length limit kept), checking the clock per iteration."""

        def __init__(self, *args):
            self.r = sandbox_range(*args)

        def __len__(self):
            return len(self.r)

        def __iter__(self):
            for i in self.r:
                check_time()
                yield i

    def raise_exception(message):
        raise ChatTemplateError(f"chat template: {message}")

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    sandbox_range = env.globals["range"]
    env.globals["range"] = TimedRange
    special = {name: getattr(tokenizer, name, None) or ""
               for name in ("bos_token", "eos_token")} if tokenizer is not None else {}
    try:
        compiled = env.from_string(template)
        parts, size = [], 0
        for chunk in compiled.generate(messages=messages,
                                       add_generation_prompt=add_generation_prompt, **special):
            check_time()
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"chat template: output longer than "
                                        f"{MAX_OUTPUT_CHARS} characters")
            parts.append(chunk)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template:{e.lineno}: syntax error: {e.message}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"chat template: refused by the sandbox: {e}") from None
    except IRLMError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError) as e:
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None
