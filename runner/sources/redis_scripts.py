"""The Lua scripts of the Redis queue (runner/sources/redis.py): every change of a task's state is one
script, so that the record, the indexes and the stream move together or not at all.

Each script gets ``ARGV[1]`` = the key prefix, ``ARGV[2]`` = now (the caller's clock, seconds),
``ARGV[3]`` = the retention in milliseconds, then its own arguments from ``ARGV[4]`` on. Keys are
built inside the scripts from the prefix: one Redis, not a cluster (README).

Keys, for a prefix P:

- ``P:task:{id}``      a hash: the task's record (what GET /tasks/{id} shows, and its lease holder)
- ``P:stream:{type}``  a stream per task type, consumer group ``workerhost``; an entry is ``id={task id}``
                       and the record's ``entry`` names the one live entry of a queued or running task
- ``P:delayed:{type}`` a sorted set: retries by due time, moved back to the stream when due
- ``P:status:{s}``     a sorted set per status, by creation time (lists, counts)
- ``P:type:{type}``, ``P:all``  sorted sets by creation time (lists)
- ``P:finished``       a sorted set by end time (prune)
- ``P:idem:{key}``     the task id an idempotency key names
- ``P:owners``         a hash: owner token -> "host id|last seen"; ``P:alive:{owner}`` expires with the lease
"""

from __future__ import annotations

GROUP = "workerhost"
STATUSES = ("pending", "running", "completed", "failed", "dead")
# What an attempt's report writes; each report clears them all first.
OUTCOME_FIELDS = (
    "outcome", "retriable", "result", "error_type", "error_message", "worker", "image_id", "stderr_tail", "duration",
)  # fmt: skip

_PRELUDE = """
local P = ARGV[1]
local NOW = ARGV[2]
local RETENTION = tonumber(ARGV[3])
local GROUP = 'workerhost'
local function tkey(id) return P .. ':task:' .. id end
local function stream(t) return P .. ':stream:' .. t end
local function index(s) return P .. ':status:' .. s end

local function move(id, old, new)
  local created = redis.call('HGET', tkey(id), 'created_at')
  if old then redis.call('ZREM', index(old), id) end
  redis.call('ZADD', index(new), created, id)
  redis.call('HSET', tkey(id), 'status', new, 'updated_at', NOW)
end

local function enqueue(id, t)
  if redis.call('EXISTS', stream(t)) == 0 then
    redis.call('XGROUP', 'CREATE', stream(t), GROUP, '0', 'MKSTREAM')
  end
  local entry = redis.call('XADD', stream(t), '*', 'id', id)
  redis.call('HSET', tkey(id), 'entry', entry, 'run_at', NOW)
end

local function drop(t, entry)
  if entry and redis.call('EXISTS', stream(t)) == 1 then
    redis.call('XACK', stream(t), GROUP, entry)
    redis.call('XDEL', stream(t), entry)
  end
end

local function finish(id)
  local k = tkey(id)
  redis.call('ZADD', P .. ':finished', NOW, id)
  redis.call('HSET', k, 'finished_at', NOW)
  redis.call('HDEL', k, 'owner', 'entry', 'run_at')
  -- prune() deletes it at the retention; the expiry is the backstop when no host runs a janitor
  local keep = RETENTION + 3600000
  redis.call('PEXPIRE', k, keep)
  local key = redis.call('HGET', k, 'idempotency_key')
  if key then redis.call('PEXPIRE', P .. ':idem:' .. key, keep) end
end

local function dead(id, old, kind, message)
  local k = tkey(id)
  redis.call('HDEL', k, 'result')
  redis.call('HSET', k, 'outcome', 'failed', 'retriable', '1', 'error_type', kind, 'error_message', message)
  move(id, old, 'dead')
  finish(id)
end

-- Take the task an entry names for ARGV[4] (the owner): a stale entry (its task deleted, settled or
-- queued again since) is dropped; a lease that expired on the last attempt is a dead letter.
local function take(t, entry, id)
  local k = tkey(id)
  local rec = redis.call('HMGET', k, 'status', 'entry', 'attempts', 'max_attempts')
  local status = rec[1]
  if (status ~= 'pending' and status ~= 'running') or rec[2] ~= entry then
    drop(t, entry)
    return false
  end
  local attempts = tonumber(rec[3])
  if status == 'running' and attempts >= tonumber(rec[4]) then
    drop(t, entry)
    dead(id, 'running', 'LeaseExpired', 'its host stopped renewing the lease and no attempt is left')
    return false
  end
  redis.call('HSET', k, 'attempts', attempts + 1, 'owner', ARGV[4], 'started_at', NOW)
  redis.call('HDEL', k, 'run_at')
  move(id, status, 'running')
  return redis.call('HGETALL', k)
end

local function field(values, name)
  for i = 1, #values, 2 do
    if values[i] == name then return values[i + 1] end
  end
  return false
end
"""

# ARGV[4] owner, ARGV[5] lease (ms), ARGV[6] the most tasks in all, then for each worker: its free slots,
# how many types it has, its types. Due retries back to their streams, then leases past their time
# (XPENDING IDLE, taken over with XCLAIM), then new entries (XREADGROUP, never blocking in a script),
# at most each worker's free slots and the most in all. Returns a list of {type, entry, record}.
CLAIM_MANY = (
    _PRELUDE
    + """
local owner, lease, left = ARGV[4], ARGV[5], tonumber(ARGV[6])
local groups = {}
local i = 7
while i <= #ARGV do
  local group = {free = tonumber(ARGV[i]), types = {}}
  for j = 1, tonumber(ARGV[i + 1]) do group.types[j] = ARGV[i + 1 + j] end
  groups[#groups + 1] = group
  i = i + 2 + #group.types
end
local claimed = {}
local function room(group) return group.free > 0 and left > 0 end
local function took(group, t, entry, record)
  claimed[#claimed + 1] = {t, entry, record}
  group.free = group.free - 1
  left = left - 1
end
-- An entry now ours (taken over or read): its task is claimed, unless take() finds it gone.
local function accept(group, t, e)
  local record = take(t, e[1], field(e[2], 'id'))
  if record then took(group, t, e[1], record) end
end
for _, group in ipairs(groups) do
  for _, t in ipairs(group.types) do
    local delayed = P .. ':delayed:' .. t
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', NOW, 'LIMIT', 0, 100)) do
      redis.call('ZREM', delayed, id)
      if redis.call('HGET', tkey(id), 'status') == 'pending' then enqueue(id, t) end
    end
  end
end
for _, group in ipairs(groups) do
  for _, t in ipairs(group.types) do
    if room(group) and redis.call('EXISTS', stream(t)) == 1 then
      -- Only entries idle past the lease, found by the server however many live ones come first
      -- (XAUTOCLAIM looks at a few entries per call), then taken over one by one.
      for _, p in ipairs(redis.call('XPENDING', stream(t), GROUP, 'IDLE', lease, '-', '+', 10)) do
        if not room(group) then break end
        for _, e in ipairs(redis.call('XCLAIM', stream(t), GROUP, owner, lease, p[1])) do
          if type(e) == 'table' then accept(group, t, e) end
        end
      end
    end
  end
end
for _, group in ipairs(groups) do
  for _, t in ipairs(group.types) do
    if redis.call('EXISTS', stream(t)) == 1 then
      for _ = 1, 50 do
        if not room(group) then break end
        local count = math.min(group.free, left)
        local read = redis.call('XREADGROUP', 'GROUP', GROUP, owner, 'COUNT', count, 'STREAMS', stream(t), '>')
        if not read then break end
        for _, e in ipairs(read[1][2]) do accept(group, t, e) end
      end
    end
  end
end
return claimed
"""
)

# ARGV[4] owner, ARGV[5] type, ARGV[6] entry, ARGV[7] task id: take what a blocking read delivered.
TAKE = (
    _PRELUDE
    + """
local record = take(ARGV[5], ARGV[6], ARGV[7])
if record then return {ARGV[5], ARGV[6], record} end
return false
"""
)

# ARGV[4] type, ARGV[5] entry, ARGV[6] task id: an entry a blocking read delivered beyond the one
# asked for, handed back (to the end of its stream).
HAND_BACK = (
    _PRELUDE
    + """
local t, entry, id = ARGV[4], ARGV[5], ARGV[6]
local rec = redis.call('HMGET', tkey(id), 'status', 'entry')
drop(t, entry)
if rec[1] == 'pending' and rec[2] == entry then enqueue(id, t) end
return 1
"""
)

_HOLDS = """
local k = tkey(ARGV[5])
local rec = redis.call('HMGET', k, 'status', 'owner', 'attempts', 'type', 'entry', 'max_attempts', 'settled')
local holds = rec[1] == 'running' and rec[2] == ARGV[4] and rec[3] == ARGV[6]
"""

# ARGV[4] owner, ARGV[5] task id, ARGV[6] attempt: the lease is the entry's idle time in the group's
# pending list; XCLAIM to the same consumer resets it. 0: the task is no longer ours.
RENEW = (
    _PRELUDE
    + _HOLDS
    + """
if not holds then return 0 end
redis.call('XCLAIM', stream(rec[4]), GROUP, ARGV[4], 0, rec[5], 'JUSTID')
return 1
"""
)

# ARGV[4] owner, ARGV[5] task id, ARGV[6] attempt, ARGV[7] new status, ARGV[8] when a retry is due,
# ARGV[9..] field, value pairs. The outcome is stored and the entry acknowledged in one step.
# 1: stored (or stored already, by this very report tried again); 0: the lease was lost.
SETTLE = (
    _PRELUDE
    + _HOLDS
    + """
local mark = ARGV[4] .. '/' .. ARGV[6]
if not holds then
  if rec[7] == mark then return 1 end
  return 0
end
local id, status = ARGV[5], ARGV[7]
drop(rec[4], rec[5])
redis.call('HDEL', k, 'owner', 'entry', """
    + ", ".join(f"'{name}'" for name in OUTCOME_FIELDS)
    + """)
for i = 9, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', k, 'settled', mark)
move(id, 'running', status)
if status == 'pending' then
  redis.call('HSET', k, 'run_at', ARGV[8])
  redis.call('ZADD', P .. ':delayed:' .. rec[4], ARGV[8], id)
else
  finish(id)
end
return 1
"""
)

# ARGV[4] owner, ARGV[5] task id: handed back unfinished; the attempt does not count.
RELEASE = (
    _PRELUDE
    + """
local k = tkey(ARGV[5])
local rec = redis.call('HMGET', k, 'status', 'owner', 'attempts', 'type', 'entry')
if rec[1] ~= 'running' or rec[2] ~= ARGV[4] then return 0 end
drop(rec[4], rec[5])
redis.call('HSET', k, 'attempts', math.max(tonumber(rec[3]) - 1, 0))
redis.call('HDEL', k, 'owner')
move(ARGV[5], 'running', 'pending')
enqueue(ARGV[5], rec[4])
return 1
"""
)

# ARGV[4] the dead owner, ARGV[5] task id, ARGV[6] attempt: like an expired lease, at once.
RECOVER = (
    _PRELUDE
    + _HOLDS
    + """
if not holds then return 0 end
drop(rec[4], rec[5])
redis.call('HDEL', k, 'owner', 'entry')
if tonumber(rec[3]) >= tonumber(rec[6]) then
  dead(ARGV[5], 'running', 'HostDied', 'its host died while it ran, and no attempt is left')
else
  move(ARGV[5], 'running', 'pending')
  enqueue(ARGV[5], rec[4])
end
return 1
"""
)

_CREATE = """
-- A new task: its record, its indexes, its entry in its type's stream.
local function create(id, t, params, priority, max_attempts, key, correlation_id, tp)
  local k = tkey(id)
  if key ~= '' then redis.call('SET', P .. ':idem:' .. key, id) end
  redis.call('HSET', k, 'id', id, 'type', t, 'params', params, 'priority', priority, 'attempts', 0,
    'max_attempts', max_attempts, 'correlation_id', correlation_id, 'created_at', NOW)
  if key ~= '' then redis.call('HSET', k, 'idempotency_key', key) end
  if tp ~= '' then redis.call('HSET', k, 'traceparent', tp) end
  redis.call('ZADD', P .. ':all', NOW, id)
  redis.call('ZADD', P .. ':type:' .. t, NOW, id)
  move(id, false, 'pending')
  enqueue(id, t)
end

local function same(id, t, params)
  local rec = redis.call('HMGET', tkey(id), 'type', 'params')
  return rec[1] == t and rec[2] == params
end
"""

# ARGV[4] id, [5] type, [6] params, [7] priority, [8] max_attempts, [9] idempotency key ('' none),
# [10] correlation id, [11] traceparent ('' none). Returns {1, id, record} (new), {0, id, record} (the task
# the key names) or {-1, id} (the id is taken).
SUBMIT = (
    _PRELUDE
    + _CREATE
    + """
local id, t, key = ARGV[4], ARGV[5], ARGV[9]
if key ~= '' then
  local existing = redis.call('GET', P .. ':idem:' .. key)
  if existing and redis.call('EXISTS', tkey(existing)) == 1 then
    return {0, existing, redis.call('HGETALL', tkey(existing))}
  end
end
if redis.call('EXISTS', tkey(id)) == 1 then
  -- This very submit, sent again after its reply was lost (the API's client retries once): as created.
  if same(id, t, ARGV[6]) then return {1, id, redis.call('HGETALL', tkey(id))} end
  return {-1, id}
end
create(id, t, ARGV[6], ARGV[7], ARGV[8], key, ARGV[10], ARGV[11])
return {1, id, redis.call('HGETALL', tkey(id))}
"""
)

# ARGV[4] how many tasks, then 8 arguments for each, as SUBMIT's ARGV[4..11]. Every task is stored, or
# none: first what each item is (new, the task its key names, or a key or id that names other content),
# then, only when no item conflicts, the writes. Returns {1, {created, id, record}...} in order, or
# {0, {index from 0, what the key names}...}.
SUBMIT_MANY = (
    _PRELUDE
    + _CREATE
    + """
local n = tonumber(ARGV[4])
local function arg(i, f) return ARGV[4 + (i - 1) * 8 + f] end
local first, known, conflicts = {}, {}, {}
for i = 1, n do
  local id, t, params, key = arg(i, 1), arg(i, 2), arg(i, 3), arg(i, 6)
  if key ~= '' and first[key] then
    local f = first[key]
    if arg(f, 2) == t and arg(f, 3) == params then known[i] = {0, arg(f, 1)}
    else conflicts[#conflicts + 1] = {i - 1, '[' .. (f - 1) .. '] of this batch'} end
  elseif key ~= '' and redis.call('GET', P .. ':idem:' .. key)
      and redis.call('EXISTS', tkey(redis.call('GET', P .. ':idem:' .. key))) == 1 then
    local existing = redis.call('GET', P .. ':idem:' .. key)
    if same(existing, t, params) then known[i] = {0, existing}
    else conflicts[#conflicts + 1] = {i - 1, 'task ' .. existing} end
  elseif redis.call('EXISTS', tkey(id)) == 1 then
    -- This very batch, sent again after its reply was lost: as created.
    if same(id, t, params) then known[i] = {1, id}
    else conflicts[#conflicts + 1] = {i - 1, 'task ' .. id} end
  elseif key ~= '' then
    first[key] = i
  end
end
if #conflicts > 0 then
  local refused = {0}
  for _, conflict in ipairs(conflicts) do refused[#refused + 1] = conflict end
  return refused
end
local replies = {1}
for i = 1, n do
  local flag, id = 1, arg(i, 1)
  if known[i] then
    flag, id = known[i][1], known[i][2]
  else
    create(id, arg(i, 2), arg(i, 3), arg(i, 4), arg(i, 5), arg(i, 6), arg(i, 7), arg(i, 8))
  end
  replies[#replies + 1] = {flag, id, redis.call('HGETALL', tkey(id))}
end
return replies
"""
)

# ARGV[4] task id, ARGV[5] max_attempts ('' keeps it). The record queued again, as new; 0: not failed nor dead.
RETRY = (
    _PRELUDE
    + """
local id = ARGV[4]
local k = tkey(id)
local rec = redis.call('HMGET', k, 'status', 'type', 'idempotency_key')
if rec[1] ~= 'failed' and rec[1] ~= 'dead' then return 0 end
redis.call('PERSIST', k)
if rec[3] then redis.call('PERSIST', P .. ':idem:' .. rec[3]) end
redis.call('ZREM', P .. ':finished', id)
redis.call('HDEL', k, 'finished_at', 'settled', """
    + ", ".join(f"'{name}'" for name in OUTCOME_FIELDS)
    + """)
redis.call('HSET', k, 'attempts', 0)
if ARGV[5] ~= '' then redis.call('HSET', k, 'max_attempts', ARGV[5]) end
move(id, rec[1], 'pending')
enqueue(id, rec[2])
return redis.call('HGETALL', k)
"""
)

_FORGET = """
local function forget(id, rec)
  local t = rec[2]
  if t then
    drop(t, rec[3])
    redis.call('ZREM', P .. ':delayed:' .. t, id)
    redis.call('ZREM', P .. ':type:' .. t, id)
  end
  for _, s in ipairs({'pending', 'running', 'completed', 'failed', 'dead'}) do redis.call('ZREM', index(s), id) end
  redis.call('ZREM', P .. ':all', id)
  redis.call('ZREM', P .. ':finished', id)
  if rec[4] and redis.call('GET', P .. ':idem:' .. rec[4]) == id then redis.call('DEL', P .. ':idem:' .. rec[4]) end
  redis.call('DEL', tkey(id))
end
"""

# ARGV[4] task id. {1, status}: deleted; {0, 'running'}: refused; {0}: no such task.
DELETE = (
    _PRELUDE
    + _FORGET
    + """
local id = ARGV[4]
local rec = redis.call('HMGET', tkey(id), 'status', 'type', 'entry', 'idempotency_key')
if not rec[1] then return {0} end
if rec[1] == 'running' then return {0, 'running'} end
forget(id, rec)
return {1, rec[1]}
"""
)

# ARGV[4] the cutoff (seconds): finished tasks that ended before it, up to 500 a call; how many.
PRUNE = (
    _PRELUDE
    + _FORGET
    + """
local ids = redis.call('ZRANGEBYSCORE', P .. ':finished', '-inf', ARGV[4], 'LIMIT', 0, 500)
for _, id in ipairs(ids) do
  local rec = redis.call('HMGET', tkey(id), 'status', 'type', 'entry', 'idempotency_key')
  if rec[1] == 'running' or rec[1] == 'pending' then
    redis.call('ZREM', P .. ':finished', id)
  else
    forget(id, rec)
  end
end
return #ids
"""
)
