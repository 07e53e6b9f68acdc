"""Hand-made mutants of tasks/status.py's Lua scripts, run against tests/tasks/test_status_store.py.

mutmut mutates only code inside functions, so the module-level Lua strings, where the status rules live,
get no mutants from `make mutants`. This applies each mutation below to its file in turn (restored
afterwards, also on Ctrl-C), runs the status tests, and lists the survivors; mutation/MUTANTS.md explains the
ones left. The scripts' rank table is made from `JobState.rank`, so the rank mutants change tasks/schemas.py.
Run from the repository root: `.venv/bin/python mutation/lua_mutants.py [INDEX ...]`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tasks" / "status.py"
SCHEMAS = ROOT / "tasks" / "schemas.py"
_CHANNEL = '\'"""\n    + EVENTS_CHANNEL\n    + """\')'  # the events channel, as the source spells it
_WRITE_EVENT = "table.insert(events, write(key, record, A[2]))"  # write the record, publish it with the batch
_PUBLISH = "publish(json, " + _CHANNEL
_FINISH = "  add(change, 'finished_at', A[3])\n  "
_END_LEASE = "  add(gone, 'lease_owner', 'lease_until')"
_WRITE = "redis.call('SET', key, json, 'EX', tonumber(ttl))"


class Mutation(NamedTuple):
    old: str  # occurs exactly once in `source`
    new: str
    source: Path = SOURCE


MUTATIONS: list[Mutation | tuple[str, str]] = [  # a pair: a text of tasks/status.py
    # _COMMON: the rank table (made from JobState.rank), then publish
    Mutation("JobState.RETRYING: 1,", "JobState.RETRYING: 0,", SCHEMAS),
    Mutation("JobState.STARTED: 1,", "JobState.STARTED: 0,", SCHEMAS),
    Mutation("JobState.FAILED: FINISHED_RANK,", "JobState.FAILED: 1,", SCHEMAS),
    Mutation("JobState.CANCELLED: FINISHED_RANK,", "JobState.CANCELLED: 1,", SCHEMAS),
    Mutation("JobState.SUCCEEDED: FINISHED_RANK,", "JobState.SUCCEEDED: 1,", SCHEMAS),
    ("record[flat[i]] = flat[i + 1]", "record[flat[i]] = flat[i]"),
    ("  for i = 1, #pairs, 2 do record[pairs[i]] = pairs[i + 1] end\n", ""),
    ("for _, name in ipairs(names) do record[name] = nil end", ""),
    (_WRITE, "redis.call('SET', key, json)"),
    ("    hashes[key] = true\n", ""),
    ("    redis.call('DEL', key)\n", ""),
    ("    redis.call('EXPIRE', key, tonumber(ttl))\n", ""),
    ("    redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until')\n", ""),
    (_WRITE, "redis.call('SET', key, json, 'EX', 3600)"),
    ("  if #events == 1 then\n    publish(events[1], channel)\n  elseif", "  if false then\n  elseif"),
    ("publish('[' .. table.concat(events, ',') .. ']', channel)", "publish(events[1], channel)"),
    ("    i = i + n + 1\n", "    i = i + n\n"),
    # _TRANSITION
    (
        "if A[4] ~= '1' or rank[A[1]] ~= FINISHED then return {0, ''} end",
        "if A[4] ~= '1' then return {0, ''} end",
    ),
    (
        "if A[4] ~= '1' or rank[A[1]] ~= FINISHED then return {0, ''} end",
        "if rank[A[1]] ~= FINISHED then return {0, ''} end",
    ),
    ("add(change, 'created_at', A[3], 'recreated', '1')", "add(change, 'recreated', '1')"),
    (
        "if rank[cur] == FINISHED or rank[A[1]] < rank[cur] then return {0, cur} end",
        "if rank[A[1]] < rank[cur] then return {0, cur} end",
    ),
    (
        "if rank[cur] == FINISHED or rank[A[1]] < rank[cur] then return {0, cur} end",
        "if rank[cur] == FINISHED or rank[A[1]] <= rank[cur] then return {0, cur} end",
    ),
    (
        "if rank[cur] == FINISHED or rank[A[1]] < rank[cur] then return {0, cur} end",
        "if rank[cur] == FINISHED then return {0, cur} end",
    ),
    ("add(change, 'state', A[1], 'updated_at', A[3])\n  for", "add(change, 'state', A[1])\n  for"),
    ("for i = 5, #A, 2 do", "for i = 7, #A, 2 do"),
    ("if A[1] == 'succeeded' then add(gone, 'error') end", ""),
    (_FINISH + _END_LEASE, _END_LEASE),
    (_FINISH + _END_LEASE, _FINISH + "  add(gone, 'lease_owner')"),
    (_FINISH + _END_LEASE, _FINISH + "  add(gone, 'lease_until')"),
    ("set(record, change)\n  drop(record, gone)", "set(record, change)"),
    (_WRITE_EVENT + "\n  return {1, A[1]}", "write(key, record, A[2])\n  return {1, A[1]}"),
    (_WRITE_EVENT + "\n  return {1, A[1]}", "return {1, A[1]}"),
    # _BEGIN
    (
        "add(change, 'job_id', A[6], 'state', 'queued', 'created_at', A[3])",
        "add(change, 'state', 'queued', 'created_at', A[3])",
    ),
    (
        "add(change, 'job_id', A[6], 'state', 'queued', 'created_at', A[3])",
        "add(change, 'job_id', A[6], 'state', 'queued')",
    ),
    ("if rank[cur] == FINISHED then return {cur, tonumber(record.attempts or '0'), '0'} end", ""),
    (
        "if rank[cur] == FINISHED then return {cur, tonumber(record.attempts or '0'), '0'} end",
        "if rank[cur] == FINISHED then return {cur, 0, '0'} end",
    ),
    ("if owner and owner ~= A[7] and left > 0 then", "if owner and left > 0 then"),
    ("if owner and owner ~= A[7] and left > 0 then", "if owner and owner ~= A[7] then"),
    ("if owner and owner ~= A[7] and left > 0 then", "if owner ~= A[7] and left > 0 then"),
    ("if owner and owner ~= A[7] and left > 0 then", "if owner and owner ~= A[7] and left > 1 then"),
    (
        "  return {'leased', tonumber(record.attempts or '0'), tostring(left)}",
        "  return {'leased', 0, tostring(left)}",
    ),
    ("local left = tonumber(record.lease_until or '0') - now", "local left = tonumber(record.lease_until or '0')"),
    ("local n = tonumber(record.attempts or '0') + 1", "local n = tonumber(record.attempts or '0') + 2"),
    ("add(change, 'attempts', tostring(n))", ""),
    ("if n > tonumber(A[1]) then", "if n >= tonumber(A[1]) then"),
    ("add(change, 'error', A[5], 'finished_at', A[3])", "add(change, 'error', A[5])"),
    ("add(change, 'error', A[5], 'finished_at', A[3])", "add(change, 'finished_at', A[3])"),
    ("elseif record.cancel_requested == '1' then", "elseif false then"),
    ("  state = 'cancelled'\n    add(change, 'finished_at', A[3])", "  state = 'cancelled'"),
    ("  add(change, 'started_at', A[3], 'worker', A[4])", "  add(change, 'worker', A[4])"),
    ("  add(change, 'started_at', A[3], 'worker', A[4])", "  add(change, 'started_at', A[3])"),
    ("  if A[7] ~= '' then", "  if true then"),
    ("'lease_until', tostring(now + tonumber(A[8])))", "'lease_until', tostring(now))"),
    ("'lease_until', tostring(now + tonumber(A[8])))", "'lease_until', tostring(now + 2 * tonumber(A[8])))"),
    ("add(change, 'state', state, 'updated_at', A[3])", "add(change, 'state', state)"),
    (_WRITE_EVENT + "\n  return {state, n, '0'}", "return {state, n, '0'}"),
    (_WRITE_EVENT + "\n  return {state, n, '0'}", "write(key, record, A[2])\n  return {state, n, '0'}"),
    ("now = now or clock()", "now = clock()"),
    ("tonumber(t[1]) + tonumber(t[2]) / 1e6", "tonumber(t[1])"),
    ("tonumber(t[1]) + tonumber(t[2]) / 1e6", "tonumber(t[1]) + tonumber(t[2]) / 1e3"),
    # _RENEW
    ("if (record.state == 'started' or record.state == 'retrying') and", "if"),
    ("if (record.state == 'started' or record.state == 'retrying') and", "if (record.state == 'started') and"),
    ("if (record.state == 'started' or record.state == 'retrying') and", "if (record.state == 'retrying') and"),
    ("record.lease_owner == ARGV[i + 2] then", "record.lease_owner == ARGV[i + 2] or true then"),
    ("    write(key, record, ARGV[2])\n", ""),
    ("    record.lease_until = expiry\n", ""),
    (
        "local expiry = tostring(clock() + tonumber(ARGV[1]))",
        "local expiry = tostring(clock() + 2 * tonumber(ARGV[1]))",
    ),
    ("    extended = extended + 1", "    extended = 1"),
    # _RELEASE
    ("if record.lease_owner == ARGV[1] then", "if true then"),
    ("drop(record, {'lease_owner', 'lease_until'})", "drop(record, {'lease_owner'})"),
    ("drop(record, {'lease_owner', 'lease_until'})", "drop(record, {'lease_until'})"),
    ("  redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')\n", ""),
    ("cjson.encode(record), 'KEEPTTL')", "cjson.encode(record))"),
    # _CANCEL
    ("if not cur then return '' end\nif rank[cur] == FINISHED then return cur end", "if not cur then return '' end"),
    (
        "local change = {'cancel_requested', '1', 'updated_at', ARGV[2]}",
        "local change = {'updated_at', ARGV[2]}",
    ),
    (
        "local change = {'cancel_requested', '1', 'updated_at', ARGV[2]}",
        "local change = {'cancel_requested', '1'}",
    ),
    ("if cur == 'queued' or cur == 'retrying' then", "if cur == 'queued' then"),
    ("if cur == 'queued' or cur == 'retrying' then", "if cur == 'retrying' then"),
    ("if cur == 'queued' or cur == 'retrying' then", "if true then"),
    (
        "  add(change, 'state', 'cancelled', 'finished_at', ARGV[2])",
        "  add(change, 'state', 'cancelled')",
    ),
    ("  cur = 'cancelled'\nend", "end"),
    ("if cur == 'cancelled' then\n  " + _PUBLISH + "\nend\n", ""),
    ("local json = write(KEYS[1], record, ARGV[1])", "local json = cjson.encode(record)"),
    ('redis.call(\'PUBLISH\', \'"""\n    + CANCEL_CHANNEL\n    + """\', ARGV[3])\nreturn cur', "return cur"),
]


def main(only: set[int]) -> int:
    mutations = [Mutation(*m) for m in MUTATIONS]
    originals = {path: path.read_text(encoding="utf-8") for path in {m.source for m in mutations}}
    survivors = []
    try:
        for i, (old, new, source) in enumerate(mutations):
            if only and i not in only:
                continue
            original = originals[source]
            if original.count(old) != 1:
                print(f"#{i}: the text occurs {original.count(old)} times in {source.name}, not once: {old[:60]!r}")
                survivors.append(i)
                continue
            source.write_text(original.replace(old, new), encoding="utf-8")
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "tests/tasks/test_status_store.py"]
            try:
                alive = subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
            finally:
                source.write_text(original, encoding="utf-8")
            print(f"#{i} {'SURVIVED' if alive else 'killed'}: {old[:70]!r} -> {new[:70]!r}", flush=True)
            survivors += [i] if alive else []
    finally:
        for path, text in originals.items():
            path.write_text(text, encoding="utf-8")
    listed = (ROOT / "mutation" / "MUTANTS.md").read_text(encoding="utf-8")
    unlisted = [i for i in survivors if f"`#{i}`" not in listed]
    print(f"Lua scripts of tasks/status.py: {len(MUTATIONS)} mutants, {len(MUTATIONS) - len(survivors)} killed;"
          f" survivors {survivors}" + (f", not in mutation/MUTANTS.md: {unlisted}" if unlisted else ""))  # fmt: skip
    return 1 if unlisted else 0


if __name__ == "__main__":
    sys.exit(main(set(map(int, sys.argv[1:]))))
