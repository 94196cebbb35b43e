"""Prompt templates as data: Jinja text rendered in an immutable sandbox (``jinja2.sandbox``), so a template
from someone else can neither reach Python internals (``__class__``, ``__globals__``, ...) nor change the
values it is given, and an undefined variable is an error rather than an empty string.

A template is a built-in name (``BUILTIN``) or a file (``.j2``/``.jinja``/``.txt``, at most
``MAX_TEMPLATE_BYTES``). Task templates see ``text`` (the task's prompt for the example), ``choices``,
``description``, ``shots`` (a list of ``{text, target}``), ``target_delimiter`` and ``fewshot_delimiter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from fmforge.errors import FmforgeError, clip
from fmforge.io.bounded import read_bounded

MAX_TEMPLATE_BYTES = 256 << 10
TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2", ".txt")

# lm-evaluation-harness's layout, then two common rewordings of it: what `prompt eval` compares by default.
BUILTIN: dict[str, str] = {
    "lm-eval": ("{{ description }}{% for s in shots %}{{ s.text }}{{ target_delimiter }}{{ s.target }}"
                "{{ fewshot_delimiter }}{% endfor %}{{ text }}"),
    "instruct": ("Answer the question with one of the options given.\n\n"
                 "{% for s in shots %}{{ s.text }}{{ target_delimiter }}{{ s.target }}{{ fewshot_delimiter }}"
                 "{% endfor %}{{ text }}"),
    "options": ("{% for s in shots %}{{ s.text }}{{ target_delimiter }}{{ s.target }}{{ fewshot_delimiter }}"
                "{% endfor %}{% if choices %}Options: {{ choices | join(', ') }}\n{% endif %}{{ text }}"),
}

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    source: str
    template: object  # jinja2.Template, compiled in the sandbox

    def render(self, **values) -> str:
        """The prompt; an undefined variable or a sandbox violation is a one-line error naming the template."""
        try:
            return self.template.render(**values)
        except SecurityError as err:
            raise FmforgeError(f"template {self.name}: refused by the sandbox: {clip(str(err), 120)}") from None
        except UndefinedError as err:
            raise FmforgeError(f"template {self.name}: undefined variable ({clip(str(err), 100)}); it may use "
                               f"{', '.join(sorted(values))}") from None
        except TemplateError as err:
            raise FmforgeError(f"template {self.name}: {clip(str(err), 120)}") from None
        except (TypeError, ValueError, ArithmeticError, AttributeError, LookupError, RecursionError) as err:
            raise FmforgeError(f"template {self.name}: {type(err).__name__} while rendering: "
                               f"{clip(str(err), 100)}") from None


def compile_template(text: str, name: str) -> PromptTemplate:
    try:
        return PromptTemplate(name, text, _ENV.from_string(text))
    except TemplateSyntaxError as err:
        raise FmforgeError(f"template {name}: line {err.lineno}: {clip(err.message, 120)}") from None
    except (TemplateError, RecursionError) as err:
        raise FmforgeError(f"template {name}: {clip(str(err), 120)}") from None


def load_template(spec: str) -> PromptTemplate:
    """A built-in template by name, or a template file."""
    if spec in BUILTIN:
        return compile_template(BUILTIN[spec], spec)
    path = Path(spec)
    if not path.is_file():
        raise FmforgeError(f"template {clip(spec, 60)}: neither a built-in ({', '.join(BUILTIN)}) nor a file")
    raw = read_bounded(path, MAX_TEMPLATE_BYTES, "template ")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FmforgeError(f"template {path} is not UTF-8 text") from None
    return compile_template(text, path.name)
