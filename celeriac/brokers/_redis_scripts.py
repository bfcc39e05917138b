"""The Lua scripts of the Redis transport: every multi-key change is one atomic script.

A script runs alone on the server, so what needs two or more commands to stay consistent — pop a
message and record its lease, promote a delayed message, restore an expired lease — happens
exactly once however many workers run it at the same moment; no lock, no retry loop. The storage
layout they work on is documented in :mod:`celeriac.brokers._redis_layout`.

Conventions shared by every script (they are joined to :data:`LIBRARY`):

* no ``KEYS``: every key is built from ``ARGV[1]`` (the ``global_keyprefix``) and ``ARGV[2]`` (the
  bucket separator), like kombu's names. This rules out Redis Cluster, which kombu's transport does
  not support either;
* ``ARGV[3]`` is the caller's clock (UNIX time, as a decimal string): lease and delay times are
  client times, as kombu's ``unacked_index`` scores are, so both sides compare like with like.
  ``@<offset>`` instead means "the server's ``TIME`` plus ``offset``" — the caller's clock at the
  moment the script runs, for a fetch script queued behind a ``BLMOVE`` that may wait a while;
* envelopes are never re-encoded with ``cjson``, which would turn ``[]`` into ``{}`` and round
  large integers. A restore edits the JSON text in place with a small scanner (:data:`LIBRARY`):
  it sets ``headers.redelivered``, ``properties.delivery_info.redelivered`` and the delivery
  counter and leaves every other byte alone.

Scripts are loaded with redis-py's ``register_script`` (``EVALSHA``, loaded again after a
``NOSCRIPT``, e.g. after a server restart).
"""

from __future__ import annotations

LIBRARY = r"""
local P, SEP, NOW = ARGV[1], ARGV[2], nil
if string.sub(ARGV[3], 1, 1) == '@' then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(string.sub(ARGV[3], 2))
else
  NOW = tonumber(ARGV[3])
end
local NOW_TEXT = string.format('%.6f', NOW)
local UNACKED, INDEX = P .. 'unacked', P .. 'unacked_index'
local EXCHANGES, MAXPRIO = P .. '_celeriac.exchanges', P .. '_celeriac.max_priority'
local DEAD = P .. '_celeriac.dead_letters'
local COUNT, ORDER = 'x-celeriac-delivery-count', 'x-celeriac-order'

local function bucket(queue, step)
  step = tostring(step)
  if step == '0' then return P .. queue end
  return P .. queue .. SEP .. step
end
local function leases(queue) return P .. '_celeriac.leases.' .. queue end
local function delayed(queue) return P .. '_celeriac.delayed.' .. queue end
local function delayed_messages(queue) return P .. '_celeriac.delayed_messages.' .. queue end
local function ours(token) return string.sub(token, 1, 9) == 'celeriac:' end
local function step_of(token) return string.match(token, ':(%d+)$') or '0' end
local function order_of(token) return string.match(token, '^celeriac:(%d+):') or '' end

-- A JSON scanner: positions only, nothing is decoded or re-encoded.
local function ws(s, i) return string.find(s, '[^ \t\r\n]', i) end
local function string_end(s, i)  -- s[i] is '"'; the index after the closing quote
  local j = i + 1
  while true do
    local k = string.find(s, '["\\]', j)
    if not k then return nil end
    if string.byte(s, k) == 92 then j = k + 2 else return k + 1 end
  end
end
local function value_end(s, i)  -- s[i] starts a value; the index after it
  local c = string.byte(s, i)
  if c == 34 then return string_end(s, i) end
  if c == 123 or c == 91 then
    local depth, j = 0, i
    while true do
      local k = string.find(s, '[%[%]{}"]', j)
      if not k then return nil end
      local b = string.byte(s, k)
      if b == 34 then
        j = string_end(s, k)
        if not j then return nil end
      elseif b == 123 or b == 91 then
        depth = depth + 1
        j = k + 1
      else
        depth = depth - 1
        j = k + 1
        if depth == 0 then return j end
      end
    end
  end
  return string.find(s, '[,}%]%s]', i) or (#s + 1)
end
-- Member `name` of the object whose '{' is at i: value start and end, or nil, nil, index of '}'.
local function member(s, i, name)
  local j = ws(s, i + 1)
  if not j then return nil end
  if string.byte(s, j) == 125 then return nil, nil, j end
  while true do
    if string.byte(s, j) ~= 34 then return nil end
    local key_end = string_end(s, j)
    if not key_end then return nil end
    local colon = ws(s, key_end)
    if not colon or string.byte(s, colon) ~= 58 then return nil end
    local vs = ws(s, colon + 1)
    if not vs then return nil end
    local ve = value_end(s, vs)
    if not ve then return nil end
    if string.sub(s, j + 1, key_end - 2) == name then return vs, ve end
    local n = ws(s, ve)
    if not n then return nil end
    local b = string.byte(s, n)
    if b == 125 then return nil, nil, n end
    if b ~= 44 then return nil end
    j = ws(s, n + 1)
    if not j then return nil end
  end
end
local function object_at(s, path)  -- index of the '{' of the object at `path`, or nil
  local i = ws(s, 1)
  if not i or string.byte(s, i) ~= 123 then return nil end
  for _, name in ipairs(path) do
    local vs = member(s, i, name)
    if not vs or string.byte(s, vs) ~= 123 then return nil end
    i = vs
  end
  return i
end
local function get(s, path, name)  -- the JSON text of a member's value, or nil
  local o = object_at(s, path)
  if not o then return nil end
  local vs, ve = member(s, o, name)
  if vs then return string.sub(s, vs, ve - 1) end
  return nil
end
local function put(s, path, name, text)  -- set a member to the JSON text `text`
  local o = object_at(s, path)
  if not o then return s end
  local vs, ve, close = member(s, o, name)
  if vs then return string.sub(s, 1, vs - 1) .. text .. string.sub(s, ve) end
  if not close then return s end
  local comma = ', '
  if ws(s, o + 1) == close then comma = '' end
  return string.sub(s, 1, close - 1) .. comma .. '"' .. name .. '": ' .. text .. string.sub(s, close)
end

-- The envelope as a restore leaves it: kombu's redelivered flags, and the number of the delivery
-- that was lost in COUNT (a message kombu restored has the flags but no count: at least 2).
local function redelivered(env)
  local counted = tonumber(get(env, {'properties'}, COUNT) or '') or 0
  local flagged = get(env, {'headers'}, 'redelivered') == 'true'
    or get(env, {'properties', 'delivery_info'}, 'redelivered') == 'true'
  local lost = counted + 1
  if flagged and lost < 2 then lost = 2 end
  env = put(env, {'headers'}, 'redelivered', 'true')
  env = put(env, {'properties', 'delivery_info'}, 'redelivered', 'true')
  return put(env, {'properties'}, COUNT, string.format('%d', lost))
end

-- Put a message of ours back at the front of list `key`, at its place: behind the messages given
-- back before it that were delivered before it (ORDER: delivery time in microseconds and rank in
-- its fetch, fixed width). So messages given back one by one keep the order they were fetched in.
local function to_front(key, env, order)
  env = put(env, {'properties'}, ORDER, '"' .. order .. '"')
  local ahead = 0
  while ahead < 1000 do
    local item = redis.call('LINDEX', key, -(ahead + 1))
    if not item then break end
    local other = get(item, {'properties'}, ORDER)
    if not other or string.sub(other, 2, -2) >= order then break end
    ahead = ahead + 1
  end
  if ahead == 0 then
    redis.call('RPUSH', key, env)
    return
  end
  local front = redis.call('RPOP', key, ahead)
  redis.call('RPUSH', key, env)
  for j = #front, 1, -1 do redis.call('RPUSH', key, front[j]) end
end

-- kombu's unacked entry is the JSON array [envelope, exchange, routing_key].
local function entry_envelope(entry)
  local i = ws(entry, 2)
  local e = i and value_end(entry, i)
  if not e then return nil end
  return string.sub(entry, i, e - 1), e
end
local function entry_route(entry, e)  -- exchange and routing key, or nil
  local ok, t = pcall(cjson.decode, '[0' .. string.sub(entry, e))
  if not ok or type(t[2]) ~= 'string' or type(t[3]) ~= 'string' then return nil end
  return t[2], t[3]
end

-- Priority buckets: the step for a priority, capped by the queue's max_priority (and by 9).
local STEPS = {}
local max_priorities = {}
local function set_steps(text)
  for step in string.gmatch(text, '%d+') do STEPS[#STEPS + 1] = tonumber(step) end
end
local function step_for(queue, priority)
  local cap = max_priorities[queue]
  if cap == nil then
    cap = tonumber(redis.call('HGET', MAXPRIO, queue) or '') or false
    max_priorities[queue] = cap
  end
  local p = tonumber(priority) or 0
  if p > 9 then p = 9 end
  if cap and p > cap then p = cap end
  if p < 0 then p = 0 end
  local chosen = 0
  for _, step in ipairs(STEPS) do
    if step <= p then chosen = step end
  end
  return chosen
end
local function envelope_priority(env)
  return tonumber(get(env, {'properties'}, 'priority') or '') or 0
end

-- Routing: AMQP rules on the bindings kombu stores.
local function words(s)
  local t = {}
  if s == '' then return t end
  for w in string.gmatch(s .. '.', '([^.]*)%.') do t[#t + 1] = w end
  return t
end
local function topic_matches(pattern, key)
  local w, parts = words(key), words(pattern)
  local m = {[0] = true}
  for j = 1, #w do m[j] = false end
  for _, part in ipairs(parts) do
    if part == '#' then
      for j = 1, #w do m[j] = m[j] or m[j - 1] end
    else
      for j = #w, 1, -1 do m[j] = m[j - 1] and (part == '*' or part == w[j]) end
      m[0] = false
    end
  end
  return m[#w]
end
local tables = {}
local function exchange_table(exchange)  -- {type = ..., bindings = {{key, queue}, ...}} or nil
  local t = tables[exchange]
  if t ~= nil then return t end
  local members = redis.call('SMEMBERS', P .. '_kombu.binding.' .. exchange)
  local kind = redis.call('HGET', EXCHANGES, exchange)
  local bindings, patterned = {}, false
  for _, m in ipairs(members) do
    local a = string.find(m, SEP, 1, true)
    local b = a and string.find(m, SEP, a + #SEP, true)
    if b then
      if b > a + #SEP then patterned = true end
      bindings[#bindings + 1] = {string.sub(m, 1, a - 1), string.sub(m, b + #SEP)}
    end
  end
  table.sort(bindings, function(x, y) return x[2] < y[2] end)
  if not kind then
    if #bindings == 0 then
      tables[exchange] = false
      return false
    end
    kind = patterned and 'topic' or 'direct'
  end
  t = {type = kind, bindings = bindings}
  tables[exchange] = t
  return t
end
-- Queues a message goes to: list, exchange type; or nil, reason.
local function route(exchange, routing_key)
  if exchange == '' then
    if routing_key == '' then return nil, 'empty routing key on the default exchange' end
    return {routing_key}, 'direct'
  end
  local t = exchange_table(exchange)
  if not t then return nil, 'undeclared' end
  local out, seen = {}, {}
  for _, binding in ipairs(t.bindings) do
    local key, queue = binding[1], binding[2]
    local hit
    if t.type == 'fanout' then hit = true
    elseif t.type == 'topic' then hit = topic_matches(key, routing_key)
    else hit = key == routing_key end
    if hit and not seen[queue] then
      seen[queue] = true
      out[#out + 1] = queue
    end
  end
  if #out == 0 then return nil, 'unbound' end
  return out, t.type
end

local function dead_letter(queue_json, reason_json, envelope_json, limit)
  redis.call('LPUSH', DEAD, '{"queue": ' .. queue_json .. ', "reason": ' .. reason_json ..
    ', "at": ' .. NOW_TEXT .. ', "message": ' .. envelope_json .. '}')
  redis.call('LTRIM', DEAD, 0, limit - 1)
end

-- Take a lease of ours out of the in-flight record: its unacked entry, or nil if it was lost.
local function take(token, queue)
  redis.call('ZREM', leases(queue), token)
  local entry = redis.call('HGET', UNACKED, token)
  if entry then
    redis.call('HDEL', UNACKED, token)
    redis.call('ZREM', INDEX, token)
  end
  return entry
end
"""

CLAIM = (
    LIBRARY
    + r"""
-- Lease up to ARGV[5] messages from the queues ARGV[11 .. 10+n], in kombu's order.
--
-- ARGV: 4 visibility timeout, 5 limit, 6 token base, 7 batch limit for restores and promotions,
-- 8 foreign visibility timeout ('' = skip that scan), 9 priority steps, 10 n,
-- 11..10+n queue names, 11+n..10+2n the queue names as JSON strings, 11+2n dead letter limit.
--
-- 1. Expired leases of these queues go back to the front of their bucket, counted.
-- 2. Due delayed messages of these queues go to the front of their bucket, earliest first.
-- 3. Messages are popped by priority step, then queue order, and each is recorded in kombu's
--    unacked hash and index and in the queue's lease set under a fresh token.
-- 4. With a cutoff: unacked entries older than it that are not ours (a Celery worker's, dead
--    since) are restored to where their exchange and routing key route, as kombu would.
-- Returns {next due time or '', queue index, token, envelope, ...}.
local deadline = string.format('%.6f', NOW + tonumber(ARGV[4]))
local limit, base = tonumber(ARGV[5]), ARGV[6]
local batch, cutoff = tonumber(ARGV[7]), ''
if ARGV[8] ~= '' then cutoff = string.format('%.6f', NOW - tonumber(ARGV[8])) end
set_steps(ARGV[9])
local n = tonumber(ARGV[10])
local dead_limit = tonumber(ARGV[11 + 2 * n])
local queues, queue_json = {}, {}
for i = 1, n do
  queues[i] = ARGV[10 + i]
  queue_json[i] = ARGV[10 + n + i]
end

for i = 1, n do
  local queue = queues[i]
  local expired = redis.call('ZRANGE', leases(queue), '-inf', NOW, 'BYSCORE', 'LIMIT', 0, batch)
  for _, token in ipairs(expired) do
    local entry = take(token, queue)
    if entry then
      local env = entry_envelope(entry)
      if env then
        to_front(bucket(queue, step_of(token)), redelivered(env), order_of(token))
      else
        dead_letter(queue_json[i], '"could not restore: malformed unacked entry"',
          cjson.encode(entry), dead_limit)
      end
    end
  end
  local due = redis.call('ZRANGE', delayed(queue), '-inf', NOW, 'BYSCORE', 'LIMIT', 0, batch)
  if #due > 0 then
    local payloads = redis.call('HMGET', delayed_messages(queue), unpack(due))
    redis.call('ZREM', delayed(queue), unpack(due))
    redis.call('HDEL', delayed_messages(queue), unpack(due))
    for j = #due, 1, -1 do
      local v = payloads[j]
      if v then
        local colon = string.find(v, ':', 1, true)
        redis.call('RPUSH', bucket(queue, string.sub(v, 1, colon - 1)), string.sub(v, colon + 1))
      end
    end
  end
end

local out = {''}
local taken = 0
local micro = math.floor(NOW * 1000000)
for _, step in ipairs(STEPS) do
  for i = 1, n do
    if taken >= limit then break end
    local items = redis.call('RPOP', bucket(queues[i], step), limit - taken)
    if items then
      local lease_set = leases(queues[i])
      for _, item in ipairs(items) do
        taken = taken + 1
        local order = string.format('%016d%06d', micro, taken)
        local token = 'celeriac:' .. order .. ':' .. base .. ':' .. step
        redis.call('HSET', UNACKED, token, '[' .. item .. ', "", ' .. queue_json[i] .. ']')
        redis.call('ZADD', INDEX, NOW_TEXT, token)
        redis.call('ZADD', lease_set, deadline, token)
        out[#out + 1] = i
        out[#out + 1] = token
        out[#out + 1] = item
      end
    end
  end
end

if cutoff ~= '' then
  local old = redis.call('ZRANGE', INDEX, '-inf', cutoff, 'BYSCORE', 'LIMIT', 0, batch)
  for _, token in ipairs(old) do
    local entry = redis.call('HGET', UNACKED, token)
    redis.call('HDEL', UNACKED, token)
    redis.call('ZREM', INDEX, token)
    if entry then
      local env, e = entry_envelope(entry)
      local exchange, routing_key
      if env then exchange, routing_key = entry_route(entry, e) end
      if not exchange then
        dead_letter('""', '"could not restore: malformed unacked entry"',
          cjson.encode(entry), dead_limit)
      elseif ours(token) then
        -- A lease of ours whose queue nobody fetches any more: back to that queue.
        redis.call('ZREM', leases(routing_key), token)
        to_front(bucket(routing_key, step_of(token)), redelivered(env), order_of(token))
      else
        local targets, why = route(exchange, routing_key)
        if not targets then
          dead_letter(cjson.encode(routing_key),
            cjson.encode('could not restore: exchange ' .. exchange .. ' ' .. why),
            env, dead_limit)
        else
          local again = redelivered(env)
          local priority = envelope_priority(env)
          for _, queue in ipairs(targets) do
            redis.call('RPUSH', bucket(queue, step_for(queue, priority)), again)
          end
        end
      end
    end
  end
end

if taken == 0 then
  local next_due
  for i = 1, n do
    for _, key in ipairs({delayed(queues[i]), leases(queues[i])}) do
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      if first[2] and (not next_due or tonumber(first[2]) < tonumber(next_due)) then
        next_due = first[2]
      end
    end
  end
  out[1] = next_due or ''
end
return out
"""
)
"""Restore, promote, lease, and report when the next delayed message or lease is due."""

PUBLISH = (
    LIBRARY
    + r"""
-- Store a batch of messages: every one of them, or none.
--
-- ARGV: 4 priority steps, 5 fanout channel prefix, 6 '1' if delayed delivery is on, 7 count,
-- then 6 per message: exchange, routing key, priority, not_before ('' = now), tag, envelope.
-- A first pass routes every message; if one cannot be routed nothing is written and
-- {'unroutable', message number, reason} is returned. Otherwise ready messages are LPUSHed to
-- their bucket, delayed ones parked in the queue's delayed set (member: the tag), and fanout
-- messages PUBLISHed (best effort, as kombu). Returns {'ok', queues that got a message...}.
set_steps(ARGV[4])
local channel_prefix, delay_on, count = ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local plans = {}
for m = 1, count do
  local at = 7 + (m - 1) * 6
  local targets, kind = route(ARGV[at + 1], ARGV[at + 2])
  if not targets then return {'unroutable', m, kind} end
  plans[m] = {targets, kind}
end
local touched, seen = {'ok'}, {}
local pending_key, pending = nil, {}
local function flush()
  if pending_key then redis.call('LPUSH', pending_key, unpack(pending)) end
  pending_key, pending = nil, {}
end
for m = 1, count do
  local at = 7 + (m - 1) * 6
  local exchange, routing_key, priority = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local not_before, tag, env = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]
  local targets, kind = plans[m][1], plans[m][2]
  if kind == 'fanout' then
    flush()
    local channel = channel_prefix .. exchange
    if routing_key ~= '' then channel = channel .. '/' .. routing_key end
    redis.call('PUBLISH', channel, env)
  else
    local later = delay_on and not_before ~= '' and tonumber(not_before) > NOW
    for _, queue in ipairs(targets) do
      local step = step_for(queue, priority)
      if later then
        flush()
        redis.call('ZADD', delayed(queue), not_before, tag)
        redis.call('HSET', delayed_messages(queue), tag, step .. ':' .. env)
      else
        local key = bucket(queue, step)
        if key ~= pending_key or #pending >= 1000 then
          flush()
          pending_key = key
        end
        pending[#pending + 1] = env
      end
      if not seen[queue] then
        seen[queue] = true
        touched[#touched + 1] = queue
      end
    end
  end
end
flush()
return touched
"""
)
"""Route and store a batch atomically: one round trip, all or nothing."""

HAND_BACK = (
    LIBRARY
    + r"""
-- Give leases back. ARGV: 4 mode, 5 due time (defer), then pairs of token, queue.
--   requeue: to the front of its bucket, counted as a delivery (reject with requeue);
--   release: to the front of its bucket, not counted (a fetch cancelled before it returned);
--   defer:   into the queue's delayed set until ARGV[5], unchanged (not counted).
-- A token whose lease was lost (restored, acked) is ignored. Returns the queues touched.
local mode, due = ARGV[4], ARGV[5]
local touched = {}
for at = 6, #ARGV, 2 do
  local token, queue = ARGV[at], ARGV[at + 1]
  local entry = take(token, queue)
  local env = entry and entry_envelope(entry)
  if env then
    local step = step_of(token)
    if mode == 'defer' then
      redis.call('ZADD', delayed(queue), due, token)
      redis.call('HSET', delayed_messages(queue), token, step .. ':' .. env)
    elseif mode == 'requeue' then
      to_front(bucket(queue, step), redelivered(env), order_of(token))
    else
      to_front(bucket(queue, step), env, order_of(token))
    end
    touched[#touched + 1] = queue
  end
end
return touched
"""
)
"""Requeue, release or defer leases, each only while the lease is still held."""

DEAD_LETTER = (
    LIBRARY
    + r"""
-- Move a lease to the dead letters. ARGV: 4 limit, 5 token, 6 queue, 7 queue as JSON,
-- 8 reason as JSON. Returns 1, or 0 when the lease was lost (nothing happens then).
local entry = take(ARGV[5], ARGV[6])
local env = entry and entry_envelope(entry)
if not env then return 0 end
dead_letter(ARGV[7], ARGV[8], env, tonumber(ARGV[4]))
return 1
"""
)
"""Reject without requeue: the message goes to the capped dead-letter list with its reason."""

PURGE = (
    LIBRARY
    + r"""
-- Delete what waits in a queue: its buckets, its delayed messages, and leases that ran out and
-- were not restored yet (leases still running belong to their worker). ARGV: 4 steps, 5 queue.
-- Returns how many messages were deleted.
set_steps(ARGV[4])
local queue = ARGV[5]
local deleted = 0
for _, step in ipairs(STEPS) do
  local key = bucket(queue, step)
  deleted = deleted + redis.call('LLEN', key)
  redis.call('DEL', key)
end
deleted = deleted + redis.call('ZCARD', delayed(queue))
redis.call('DEL', delayed(queue), delayed_messages(queue))
local expired = redis.call('ZRANGE', leases(queue), '-inf', NOW, 'BYSCORE')
for _, token in ipairs(expired) do
  if take(token, queue) then deleted = deleted + 1 end
end
return deleted
"""
)
"""Purge a queue atomically and count what was deleted."""

DECLARE = (
    LIBRARY
    + r"""
-- Declare a queue. ARGV: 4 queue, 5 exchange, 6 exchange type, 7 binding key, 8 pattern,
-- 9 max priority ('' = none).
-- A named exchange keeps the type it was first declared with ({'conflict', type} otherwise);
-- the binding goes to kombu's table and, as kombu 5.7 does for queues without x-expires, to its
-- permanent set.
local queue, exchange, kind = ARGV[4], ARGV[5], ARGV[6]
if exchange ~= '' then
  local known = redis.call('HGET', EXCHANGES, exchange)
  if known and known ~= kind then return {'conflict', known} end
  redis.call('HSET', EXCHANGES, exchange, kind)
  local m = ARGV[7] .. SEP .. ARGV[8] .. SEP .. queue
  redis.call('SADD', P .. '_kombu.binding.' .. exchange, m)
  redis.call('SADD', P .. '_kombu.binding_permanent.' .. exchange, m)
end
if ARGV[9] ~= '' then
  redis.call('HSET', MAXPRIO, queue, ARGV[9])
else
  redis.call('HDEL', MAXPRIO, queue)
end
return {'ok'}
"""
)
"""Declare a queue, its exchange's type and its binding, refusing a type conflict."""
