"""``guardproxy classify "text"`` and ``guardproxy classify --reply "reply" "prompt"``: one verdict, for people.

``--json`` prints the same object ``guardproxy score`` writes for such a row.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from guardproxy.commands.score import add_model_options, load_model_and_policy, row_scorer
from guardproxy.scoring import ParsedRow
from guardproxy.signals import UNREADABLE


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user turn to score")
    parser.add_argument("--reply", default=None, help="an assistant reply to the prompt: score refusal and reply harm")
    add_model_options(parser)
    parser.add_argument("--json", action="store_true", help="print the score contract's JSON object instead")


def run(args: argparse.Namespace) -> int:
    classifier, policy = load_model_and_policy(args)
    try:
        rows = [ParsedRow(line=0, id="cli", kind="prompt", prompt=args.prompt)]
        if args.reply is not None:
            rows.append(ParsedRow(line=0, id="cli", kind="response", prompt=args.prompt, response=args.reply))
        with row_scorer(classifier, policy) as scorer:
            scored = scorer.score(rows)
        result = scored[-1]
        if args.reply is not None:
            # The input verdict too: whoever asks about a reply also wants to know whether the prompt passes.
            result["input_action"] = scored[0]["action"]
            result["jailbreak"] = scored[0]["jailbreak"]
            result["unreadable"] = scored[0]["unreadable"]
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print(render(result, classifier.thresholds.harm, classifier.thresholds.harm_high, policy.ref))
    finally:
        classifier.close()
    return 0


def _bar(p: float, width: int = 20) -> str:
    n = round(p * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def render(result: dict[str, Any], flag_at: float, high_at: float, policy_ref: str) -> str:
    harm = float(result["harm"])
    level = "harmful" if harm >= high_at else "likely harmful" if harm >= flag_at else "not harmful"
    lines = [
        f"harm        {harm:.3f} {_bar(harm)}  {level} (model threshold {flag_at:.2f}, high {high_at:.2f})",
        f"category    {result['category']}",
    ]
    if "jailbreak" in result:
        jb = float(result["jailbreak"])
        lines.append(f"jailbreak   {jb:.3f} {_bar(jb)}")
    if float(result.get("unreadable", 0.0)) >= UNREADABLE:
        lines.append(
            f"unreadable  {float(result['unreadable']):.0%} of the letters are in scripts the model reads only letter "
            "by letter: its harm score here is close to a guess"
        )
    if result["kind"] == "response":
        none, partial, full = result["refusal_probs"]
        lines += [
            f"refusal     {result['refusal']}  (none {none:.3f}, partial {partial:.3f}, full {full:.3f})",
            f"reply harm  {float(result['reply_harm']):.3f} {_bar(float(result['reply_harm']))}",
            "false refusal: "
            + ("YES: the reply refuses a request judged harmless" if result["false_refusal"] else "no"),
            f"input:  {result['input_action']} under {policy_ref}",
            f"output: {result['action']} under {policy_ref}" + (f" (rule {result['rule']})" if result["rule"] else ""),
        ]
    else:
        lines.append(
            f"verdict     {result['action']} under {policy_ref}"
            + (f" (rule {result['rule']})" if result["rule"] else "")
        )
    return "\n".join(lines)
