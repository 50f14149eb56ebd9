"""`peftkit inspect`'s text: an adapter's facts (`peftkit.inspect.inspect_adapter`) as lines for a terminal."""

from __future__ import annotations


def describe(info: dict) -> list[str]:
    """`inspect_adapter`'s facts as lines for a terminal: what the adapter is and adapts, its ranks and features, what
    it holds, how it loads, and whether vLLM and llama.cpp take it."""
    return [*_identity_lines(info), *_rank_lines(info), *_feature_lines(info), *_holding_lines(info),
            *_loading_lines(info), *_serving_lines(info)]


def _identity_lines(info: dict) -> list[str]:
    """The adapter's directory, method (and variants), base model, task (a classifier's) and targets."""
    base = info["base_model"] or "(not recorded)"
    if info["revision"]:
        base += f" @ {info['revision']}"
    modules = ", ".join(f"{name} x{n}" for name, n in info["targets"]["modules"].items())
    variants = "".join(f", {v}" for v in info["variants"])
    targets = (f"targets        {info['targets']['count']} modules: {modules}" if info["virtual_tokens"] is None
               else f"targets        the whole model: {info['virtual_tokens']} virtual tokens")
    if named := info["targets"].get("named"):  # (Uni-LoRA without save_indices: no tensor names a layer)
        names = named if isinstance(named, str) else ", ".join(sorted(named))
        targets = (f"targets        those adapter_config.json's target_modules name on the base ({names}): the file "
                   "holds no per-layer tensor")
    if (experts := info["targets"].get("experts")) is not None:
        listed = ", ".join(f"{name} {directory}" for name, directory in experts.items())
        targets = f"targets        the layers its {len(experts)} LoRA experts adapt, each in its own directory: {listed}"
    return [
        f"adapter        {info['path']}",
        f"method         {info['method']}{variants} (peft_type {info['peft_type']})",
        f"base model     {base}",
        *([_task_line(info["classifier"])] if info.get("classifier") else []),
        targets,
    ]


def _rank_lines(info: dict) -> list[str]:
    """The rank of every target, or each layer's where they differ; none for a method without a rank (IA3)."""
    lines: list[str] = []
    ranks = info["ranks"]
    if ranks is not None and not info["targets"].get("named"):
        distinct = sorted(set(ranks.values()))
        full = info["targets"]["count"] - len(ranks)  # LoKr layers whose Kronecker factors are full matrices
        if not ranks:
            lines.append("rank           none: every target's factors are full matrices")
        elif len(distinct) == 1:
            where = "every target" if not full else f"{len(ranks)} targets ({full} have full-matrix factors only)"
            lines.append(f"rank           r={distinct[0]} on {where}")
        else:
            lines.append("ranks          per layer:")
            lines += [f"                 {path}: r={r}" for path, r in ranks.items()]
    return lines


def _feature_lines(info: dict) -> list[str]:
    """What the adapter does beside its adapted layers: modules saved whole, stacked layers, aLoRA's invocation,
    LoRA on parameters, trained token rows, added tokens."""
    lines: list[str] = []
    if info["modules_to_save"]:
        lines.append(f"saved whole    {', '.join(info['modules_to_save'])}")
    if raw_stack := info["layer_replication"]:
        lines.append(f"stacked layers {raw_stack}: the base's layers stacked again (layer_replication), "
                     "sharing their weights")
    if info["alora_invocation_tokens"]:
        lines.append(f"activated      from the invocation {info['alora_invocation_tokens']} on (aLoRA): the tokens "
                     "before it keep the base's outputs; not mergeable")
    if info["target_parameters"]:
        lines.append(f"on parameters  {', '.join(info['target_parameters'])} (target_parameters): LoRA on the "
                     "parameters themselves, one update per expert of a 3-D expert stack")
    if info["trainable_tokens"]:
        lines.append("token rows     " + ", ".join(f"{path} ({n} tokens)" for path, n in info["trainable_tokens"].items())
                     + ": trained embedding rows (trainable_token_indices)")
    if info["added_tokens"]:
        lines.append(f"added tokens   {', '.join(info['added_tokens'])} (model.add_tokens): the base's tokenizer and "
                     "embeddings take them first (peftkit does; in peft, resize the base to the adapter's tokenizer)")
    return lines


def _holding_lines(info: dict) -> list[str]:
    """What the files hold: trainable and saved parameters, frozen base copies and shared tensors, dtypes, size."""
    trainable, saved = info["trainable_params"], info["saved_params"]
    where = "adapter layers" if info["virtual_tokens"] is None else "virtual tokens' table"
    tied = "; ".join(f"{copy}'s rows are {kept}'s" for copy, kept in info["tied_rows"].items())
    return [
        f"parameters     {trainable:,} trainable ({info['adapter_params']:,} in the {where})" if trainable == saved
        else f"parameters     {trainable:,} trainable; {saved:,} saved ({tied}: a head tied to the embeddings shares "
             "their trained rows, saved under both names as peft saves them)" if tied
        else f"parameters     {trainable:,} trainable; {saved:,} saved ({_saved_beyond_trained(info['method'])})",
        *([f"base copies    {', '.join(info['base_copies'])}: frozen base weights saved beside the adapter, not "
           "trained"] if info["base_copies"] else []),
        *_shared_lines(info["shared"]),
        f"dtype          {', '.join(info['dtypes'])}",
        f"size on disk   {size_text(info['size_on_disk'])}",
    ]


def _loading_lines(info: dict) -> list[str]:
    """How the adapter loads: the quantization and RoPE scaling it was trained with, remote code, and whether (or how)
    peftkit reads it."""
    lines: list[str] = []
    q = info["quantization"]
    lines.append(f"quantization   {q['method']} (double_quant {q['double_quant']}, compute {q['compute_dtype']})" if q
                 else "quantization   none recorded (trained on an unquantized base, or not by peftkit)")
    if rope := info["rope_scaling"]:
        lines.append(f"rope scaling   {rope['type']}, factor {rope['factor']:g}: peftkit loads the base so wherever the "
                     "adapter is used (peftkit.json); peft does not read it, so scale the base's RoPE there too")
    if info["trust_remote_code"]:
        lines.append("remote code    the base runs its own modelling code: merge/eval need --trust-remote-code")
    reads = info["peftkit_reads"]
    if not reads["ok"] or reads["reason"]:
        lines.append(f"peftkit        {'loads it' if reads['ok'] else 'cannot load it'}: {reads['reason']}")
    return lines


def _serving_lines(info: dict) -> list[str]:
    """The verdicts of vLLM and llama.cpp's convert_lora_to_gguf.py (`peftkit.serving`), with their notes."""
    lines: list[str] = []
    vllm = info["vllm"]
    lines.append("vLLM           " + ("would accept it" if vllm["accepts"] else "cannot serve it as saved: " +
                                      "; ".join(vllm["reasons"])))
    lines += [f"               note: {c}" for c in vllm["caveats"]]
    gguf = info["llama_cpp"]
    lines.append("llama.cpp      " + ("convert_lora_to_gguf.py would convert it" if gguf["accepts"] else
                                      "do not convert it with convert_lora_to_gguf.py: " + "; ".join(gguf["reasons"])))
    lines += [f"               note: {c}" for c in gguf["caveats"]]
    return lines


def _task_line(head: dict) -> str:
    """`task` for a SEQ_CLS adapter: a reward model (one output), or a classifier of its classes."""
    if head["outputs"] == 1:
        return ("task           sequence classification, one output: a reward model (it scores a prompt and an "
                "answer; peftkit eval --format preference)")
    classes = f": {', '.join(head['labels'])}" if head["labels"] else ""
    count = f"{head['outputs']} classes" if head["outputs"] else "its head not saved"
    return f"task           sequence classification, {count}{classes}"


def size_text(n: int) -> str:
    """A size on disk in the unit that keeps it readable (`4.0 KiB`, not `0.00 MiB`): `inspect`'s and a comparison's."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _shared_lines(shared: dict | None) -> list[str]:
    """What the file holds of the frozen tensors every adapted layer uses (VeRA's random projections)."""
    if shared is None:
        return []
    trained = ", ".join(f"{n} {tuple(s)}" for n, s in shared["saved"].items() if n in shared.get("trained", ()))
    saved = ", ".join(f"{n} {tuple(s)}" for n, s in shared["saved"].items() if n not in shared.get("trained", ()))
    lines = [f"shared         {saved}: frozen, used by every adapted layer, not trained"] if saved else []
    lines += [f"shared         {trained}: used by every adapted layer, trained once for all of them"] if trained else []
    if shared["regenerated"]:
        lines.append(f"shared         {', '.join(shared['regenerated'])} not saved: drawn again on loading from "
                     "adapter_config.json's settings (its PRNG key)")
    return lines


def _saved_beyond_trained(method: str) -> str:
    """Why a prompt-family file holds more numbers than trained: P-tuning's encoder output, Cartridge's frozen rows."""
    from peftkit.methods import METHODS

    return getattr(METHODS[method], "saved_beyond_trained", "not all of them train")
