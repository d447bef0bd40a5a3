"""The ingest benchmark's workload: Kling callbacks for many tasks, as a wrk Lua script.

Every task gets its own signed callback URL (`x-{external_task_id}`, with its
action) and delivers `submitted`, then `processing`, then `succeed` or
`failed`, as Kling's callbacks do; some stop early (still running), some
deliveries are sent twice with the same bytes (a retry), and some arrive out
of order (`processing` after the end). A task's deliveries are spread among
those of the ~170 tasks started around it, and concurrent connections reorder
neighbours further, as concurrent deliveries from Kling would.

The order of deliveries is a schedule for a block of `BLOCK` tasks, made once
from a seed. Each wrk thread plays its own blocks (thread n of T: blocks n,
n + T, ...): its delivery number `q` is entry `q % len(schedule)` of the
schedule, for task `block * BLOCK + entry.task` of a pool of `tasks`, block
being `(q // len(schedule)) * T + n`. Past the pool, tasks come round again
and their deliveries are duplicates; the caller sizes the pool and says
whether that happened.

wrk builds each body in Lua from a template per (family, status) and the
task's fields (`$name` placeholders), so the script stays small however large
the pool; `render` does the same in Python, to check and measure the bodies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench._wrk import DONE_LUA
from receiver import tokens

__all__ = ["BLOCK", "Workload", "build", "render"]

BLOCK = 2000
_PUBLIC_URL = "https://kling-hooks.example.com"  # as the URL was given to Kling; text only
_CDN = "https://cdn.klingai.com/bs2/upload-kling-api/7384910231"
_PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_KINDS = ("submitted", "processing", "succeed", "failed")
_FAILURES = (
    "Failure to pass the risk control system",
    "The task timed out in the queue, please submit it again",
    "Internal error during generation; the credits were refunded",
)


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    action: str
    weight: float
    images: int = 0  # images/generations: how many images the task asked for


_FAMILIES = (
    _Family("t2v", "videos/text2video", 0.50),
    _Family("i2v", "videos/image2video", 0.25),
    _Family("img1", "images/generations", 0.10, images=1),
    _Family("img2", "images/generations", 0.15, images=2),
)

_SUBJECTS = (
    "A red fox trotting through fresh snow at the edge of a pine forest",
    "An old fisherman mending a net on a wooden pier at dawn",
    "A paper boat drifting down a rain gutter in a busy city street",
    "A glass teapot with blooming jasmine tea on a sunlit kitchen table",
    "A lone cyclist crossing a suspension bridge in thick morning fog",
    "A robot gardener watering tomato plants in a rooftop greenhouse",
    "Two children flying a kite on a windy hill above the sea",
    "A barista pouring latte art into a white ceramic cup",
    "A humpback whale breaching beside a small sailing boat",
    "A vintage train winding through autumn mountains",
    "A cat napping on a stack of books in a cozy library",
    "Lanterns rising over a river during a night festival",
)
_DETAILS = (
    "soft volumetric light filtering through the scene",
    "shallow depth of field with creamy bokeh in the background",
    "the camera slowly dollies forward, keeping the subject centred",
    "gentle handheld movement, as if filmed on a documentary shoot",
    "warm golden hour colours with long shadows on the ground",
    "fine film grain and a subtle anamorphic lens flare",
    "a slow orbit around the subject revealing the surroundings",
    "light drizzle, reflections shimmering on every wet surface",
    "crisp details on textures such as fur, fabric and weathered wood",
    "natural, unhurried motion with no sudden cuts",
    "muted teal and amber colour grade, cinematic contrast",
    "distant ambient activity that stays out of focus",
    "steam and dust particles drifting through the light beams",
    "the subject looks up briefly, then returns to what it was doing",
    "high dynamic range, no blown highlights, deep but readable shadows",
    "wide establishing framing that ends on a medium close-up",
)
_NEGATIVES = (
    "blurry, low resolution, watermark, text, distorted hands",
    "oversaturated colours, flicker, jitter, duplicated limbs, logo",
    "cartoon, illustration, extra fingers, warped faces, compression artefacts",
    "frame drops, sudden zoom, tilted horizon, lens dirt, subtitles",
)


@dataclass(frozen=True, slots=True)
class Workload:
    """The written script and what its deliveries look like."""

    script: Path
    tasks: int  # the pool
    schedule_length: int  # deliveries per block of BLOCK tasks
    mix: dict[str, float]  # share of deliveries by status, duplicates apart
    duplicate_share: float
    out_of_order_share: float  # of tasks whose processing comes after the end
    body_bytes: dict[str, tuple[int, int, int]]  # by status: min, median, max
    families: str  # "t2v 50%, ..."

    def capacity(self, threads: int) -> int:
        """Deliveries each of `threads` wrk threads sends before its tasks come round again."""
        return self.tasks // BLOCK // threads * self.schedule_length


def _prompts(rng: random.Random) -> list[str]:
    prompts = []
    for number in range(64):
        words = [rng.choice(_SUBJECTS) + ","]
        words += [d + "," for d in rng.sample(_DETAILS, 7 + number % 5)]
        prompts.append(" ".join(words).rstrip(",") + ".")
    return prompts


def _templates() -> dict[tuple[str, str], str]:
    """Bodies with `$field` placeholders, by family and status: compact JSON, as Kling sends."""
    found: dict[tuple[str, str], str] = {}
    for family in _FAMILIES:
        info: dict[str, object] = {"external_task_id": "$ext"}
        if family.images:
            info |= {
                "model_name": "kling-v2",
                "prompt": "$prompt",
                "negative_prompt": "$negative",
                "n": family.images,
                "aspect_ratio": "1:1",
                "resolution": "2k",
            }
        else:
            info |= {
                "model_name": "kling-v2-1-master",
                "prompt": "$prompt",
                "negative_prompt": "$negative",
                "cfg_scale": 0.5,
                "mode": "pro",
                "duration": "5",
            }
            if family.name == "i2v":
                info["image"] = f"{_CDN}/input/$ext.png"
            else:
                info["aspect_ratio"] = "16:9"
        info["callback_url"] = _PUBLIC_URL + "$path"
        for kind in _KINDS:
            updated = {"submitted": "$created", "processing": "$t_proc"}.get(kind, "$t_end")
            body: dict[str, object] = {
                "task_id": "$task_id",
                "task_status": kind,
                "task_status_msg": "$failure" if kind == "failed" else "",
                "created_at": "$created",
                "updated_at": updated,
            }
            if kind == "succeed":
                body |= {
                    "final_unit_deduction": str(max(1, family.images)),
                    "watermark_info": {"enabled": True},
                }
            body["task_info"] = info
            if kind == "succeed":
                body["task_result"] = _result(family)
            text = json.dumps(body, separators=(",", ":"))
            # Numbers go in unquoted.
            for name in ("created", "t_proc", "t_end"):
                text = text.replace(f'"${name}"', f"${name}")
            found[family.name, kind] = text
    return found


def _result(family: _Family) -> dict[str, object]:
    signed = "?x-oss-expires=$expires&x-oss-signature=$sig"
    if family.images:
        return {
            "images": [
                {
                    "index": n,
                    "url": f"{_CDN}/image/$task_id-{n}_raw_image_0.png{signed}",
                    "watermark_url": f"{_CDN}/image/$task_id-{n}_wm_image_0.png{signed}",
                }
                for n in range(family.images)
            ]
        }
    folder = family.action.split("/")[1]
    return {
        "videos": [
            {
                "id": "$task_id_0",
                "url": f"{_CDN}/{folder}/$task_id-0_raw_video_1.mp4{signed}",
                "watermark_url": f"{_CDN}/{folder}/$task_id-0_wm_video_1.mp4{signed}",
                "duration": "5.1",
            }
        ]
    }


def render(template: str, fields: dict[str, str]) -> str:
    """A body from its template, as the Lua script makes it (unknown names stay as they are)."""
    return _PLACEHOLDER.sub(lambda m: fields.get(m[1], m[0]), template)


def _task_fields(
    number: int, family: _Family, secret: str, rng: random.Random, prompts: int
) -> dict[str, str]:
    if family.images:
        raw = number.to_bytes(6, "big") + rng.randbytes(9)
        task_id = "Cj" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    else:
        task_id = str(867283741759000000 + number * 7 + rng.randrange(7))
    ext = f"kr_01JDX{number:08d}{rng.randrange(36**6):06X}"
    path = tokens.callback_path(secret, tokens.task_ref(ext), family.action)
    created = 1764043200000 + number * 1500 + rng.randrange(1000)
    t_proc = created + rng.randrange(2000, 30000)
    t_end = t_proc + rng.randrange(30000, 300000)
    return {
        "family": family.name,
        "path": path,
        "task_id": task_id,
        "task_id_0": f"{task_id}_0",
        "ext": ext,
        "created": str(created),
        "t_proc": str(t_proc),
        "t_end": str(t_end),
        "expires": str(t_end // 1000 + 86400 * 30),
        "sig": hashlib.sha1(path.encode()).hexdigest(),
        "failure": _FAILURES[number % len(_FAILURES)],
        "prompt_index": str(rng.randrange(prompts)),
        "negative": _NEGATIVES[number % len(_NEGATIVES)],
    }


def _schedule(rng: random.Random) -> tuple[list[tuple[int, str]], float, float]:
    """One block's deliveries in arrival order; the duplicate and out-of-order shares."""
    events: list[tuple[float, int, str]] = []
    duplicates = swapped = 0
    for task in range(BLOCK):
        fate = rng.random()
        started = task + rng.random()  # about one task starts per unit of time
        plan = [("submitted", started)]
        processing = started + rng.uniform(1, 20)
        if fate >= 0.03:  # 3% are only submitted so far
            plan.append(("processing", processing))
        if fate >= 0.08:  # 5% more are still processing; of the rest, 1 in 9 fails
            end = processing + rng.uniform(20, 150)
            plan.append(("failed" if fate < 0.18 else "succeed", end))
            if rng.random() < 0.03:  # the processing callback is late: after the end
                plan[1] = ("processing", end + rng.uniform(0.5, 10))
                swapped += 1
        for kind, when in list(plan):
            if rng.random() < 0.04:  # Kling sends it again: same bytes
                plan.append((kind, when + rng.uniform(0.5, 30)))
                duplicates += 1
        events += [(when, task, kind) for kind, when in plan]
    events.sort()
    return [(task, kind) for _, task, kind in events], duplicates / len(events), swapped / BLOCK


_LUA = r"""-- The ingest workload for wrk, written by bench/_ingest_load.py.
local DATA = [==[{data}]==]
local BLOCK, POOL = {block}, {pool}
local HEADERS = {{["Content-Type"] = "application/json", ["User-Agent"] = "kling-bench/wrk"}}

report_fields = {{"next_position", "generated"}}
next_position, generated = 0, 0

local templates, prompts, schedule_task, schedule_kind = {{}}, {{}}, {{}}, {{}}
local names, lines, tasks = nil, {{}}, {{}}  -- a task's line is split when first used
local length, threads = 0, 1

local function split(line)
  local fields = {{}}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do fields[#fields + 1] = field end
  return fields
end

function init(args)
  local start = tonumber(args[1]) or 0
  threads = tonumber(args[2]) or 1
  for line in io.lines(DATA .. "/templates.tsv") do
    local f = split(line)
    templates[f[1]] = templates[f[1]] or {{}}
    templates[f[1]][f[2]] = f[3]
  end
  for line in io.lines(DATA .. "/prompts.txt") do prompts[#prompts + 1] = line end
  for line in io.lines(DATA .. "/tasks.tsv") do
    if names == nil then names = split(line) else lines[#lines + 1] = line end
  end
  for line in io.lines(DATA .. "/schedule.tsv") do
    local f = split(line)
    schedule_task[#schedule_task + 1] = tonumber(f[1])
    schedule_kind[#schedule_kind + 1] = f[2]
  end
  length = #schedule_task
  next_position = start
end

local function task_at(number)
  local task = tasks[number]
  if task == nil then
    task = {{}}
    for i, field in ipairs(split(lines[number])) do task[names[i]] = field end
    task.prompt = prompts[tonumber(task.prompt_index) + 1]
    task.templates = templates[task.family]
    tasks[number] = task
  end
  return task
end

-- Thread n plays blocks n, n + threads, n + 2 * threads... so each task's deliveries come
-- from one thread, in the schedule's order as far as its connections keep it.
function request()
  local q = next_position
  next_position = q + 1
  generated = generated + 1
  local slot = q % length
  local block = (q - slot) / length * threads + thread_number
  local task = task_at((block * BLOCK + schedule_task[slot + 1]) % POOL + 1)
  local body = task.templates[schedule_kind[slot + 1]]:gsub("%$([%a_][%w_]*)", task)
  return wrk.format("POST", task.path, HEADERS, body)
end
"""


def build(directory: Path, secret: str, *, tasks: int, seed: int) -> Workload:
    """Write the data files and the Lua script into `directory`; `tasks` is rounded up to BLOCKs."""
    rng = random.Random(seed)
    pool = max(1, -(-tasks // BLOCK)) * BLOCK
    directory.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(rng)
    templates = _templates()
    schedule, duplicate_share, swapped_share = _schedule(rng)
    weights = [f.weight for f in _FAMILIES]
    rows = [
        _task_fields(n, rng.choices(_FAMILIES, weights)[0], secret, rng, len(prompts))
        for n in range(pool)
    ]
    names = list(rows[0])
    (directory / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    (directory / "templates.tsv").write_text(
        "".join(f"{family}\t{kind}\t{text}\n" for (family, kind), text in templates.items())
    )
    (directory / "tasks.tsv").write_text(
        "\t".join(names) + "\n" + "".join("\t".join(r[n] for n in names) + "\n" for r in rows)
    )
    (directory / "schedule.tsv").write_text("".join(f"{t}\t{k}\n" for t, k in schedule))
    script = directory / "ingest.lua"
    script.write_text(_LUA.format(data=directory, block=BLOCK, pool=pool) + DONE_LUA)

    # The bodies of the first block, made as the script makes them, checked and measured.
    sizes: dict[str, list[int]] = {kind: [] for kind in _KINDS}
    for task, kind in schedule:
        fields = rows[task] | {"prompt": prompts[int(rows[task]["prompt_index"])]}
        body = render(templates[fields["family"], kind], fields)
        parsed = json.loads(body)
        assert parsed["task_status"] == kind and "$" not in body, body
        sizes[kind].append(len(body.encode()))
    counts = Counter(kind for _, kind in schedule)
    shares = Counter({f.name: 0 for f in _FAMILIES}) | Counter(r["family"] for r in rows)
    return Workload(
        script=script,
        tasks=pool,
        schedule_length=len(schedule),
        mix={kind: counts[kind] / len(schedule) for kind in _KINDS},
        duplicate_share=duplicate_share,
        out_of_order_share=swapped_share,
        body_bytes={
            kind: (min(s), round(statistics.median(s)), max(s)) for kind, s in sizes.items() if s
        },
        families=", ".join(
            f"{f.action}{f' n={f.images}' if f.images else ''} {shares[f.name] / pool:.0%}"
            for f in _FAMILIES
        ),
    )
