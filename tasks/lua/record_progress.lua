-- Record a driver's progress, fenced: nothing is written unless this driver still owns the
-- namespace's run and Redis still holds everything the driver saw committed.
--
-- KEYS[1] = <ns>:meta   KEYS[2] = <ns>:driver (the lock)   KEYS[3] = <ns>:checkpoints
-- KEYS[4] = <ns>:dead-letters   KEYS[5] = <ns>:backlog
-- KEYS[6 .. 5+P] = <ns>:p<p>:progress   KEYS[6+P .. 5+2P] = <ns>:p<p>:undo
-- KEYS[6+2P] = the output stream of --output redis-stream:KEY (absent: no output stream)
--
-- ARGV[1] = the run's generation   ARGV[2] = the driver's lock token   ARGV[3] = lock TTL (ms)
-- ARGV[4] = the committed epoch this driver last recorded in meta ("" = do not compare)
-- ARGV[5] = P, then P floors: the epoch through which the driver saw each partition commit
-- then, in order:
--   n, then n meta field/value pairs to set
--   a checkpoint member and its score (member "" = none)
--   backlog: -1 = leave it, else n then n field/value pairs (the hash is replaced)
--   n, then n dead letters of 10 values each (5 field/value pairs), appended to the stream
--   retained_from ("" = no retention this time): drop undo records and checkpoints before it
--   with an output stream: the committed epoch C, maxlen ("" = none), n, then n epoch/output
--     pairs: entries of epochs after C are deleted (a replay's first record), then one entry
--     (fields epoch, output; id "*") is added per pair, then the stream is trimmed to maxlen
--
-- Returns {"ok"}, or {code, partition, found, expected} and writes nothing (partition -2 = the
-- lock):
--   "gone"        meta has no generation or partitions (the namespace was reset, or Redis lost it)
--   "superseded"  a newer run owns the namespace or a partition, another run of the same
--                 generation (meta's `run` is another token), or another driver holds the lock
--   "lost"        Redis holds less than the driver saw: a partition behind its floor, or in
--                 meta an older committed epoch (partition -1) or generation (-3), or another
--                 partition count than the run's (-5: the run's rescale is gone)
--   "wrongtype"   the output stream's key holds another type (partition -4; found = the type)
--   "torn"        meta (partition -1) or a partition's progress holds part of a transaction
--                 (tasks/store.py TORN)
--
-- The output stream's entries are written by the record that commits their epochs, and
-- only by it: the stream holds the lines of the epochs through the recorded committed epoch,
-- each once, whatever crashed when. A record that is sent again (a retry after a lost reply)
-- finds meta's committed epoch moved and is refused, so it cannot add its entries twice.

-- The epoch of a stream entry (its field list), or nil for an entry the pipeline did not write.
local function epoch_of(fields)
  for f = 1, #fields, 2 do
    if fields[f] == "epoch" then
      return tonumber(fields[f + 1])
    end
  end
  return nil
end

-- Delete the output stream's entries of epochs after `through`. Entries are in epoch order
-- (added in order, and a replay deletes the tail before adding), so they are a tail of the
-- stream: the usual record looks at one entry; a replay's first record deletes what it
-- reprocesses (all of it at once when that is every entry: an ingest, or a replay from 0).
local function drop_after(stream, through)
  local last = redis.call("XREVRANGE", stream, "+", "-", "COUNT", 1)[1]
  if last == nil or (epoch_of(last[2]) or through) <= through then
    return
  end
  local first = redis.call("XRANGE", stream, "-", "+", "COUNT", 1)[1]
  if (epoch_of(first[2]) or through) > through then
    redis.call("XTRIM", stream, "MAXLEN", 0)
    return
  end
  while true do
    local tail = redis.call("XREVRANGE", stream, "+", "-", "COUNT", 256)
    local doomed = {}
    for _, entry in ipairs(tail) do
      if (epoch_of(entry[2]) or through) <= through then
        break
      end
      doomed[#doomed + 1] = entry[1]
    end
    if #doomed > 0 then
      redis.call("XDEL", stream, unpack(doomed))
    end
    if #doomed < #tail or #tail == 0 then
      return
    end
  end
end

local meta, lock = KEYS[1], KEYS[2]
local generation = tonumber(ARGV[1])
local found = redis.call("HMGET", meta, "generation", "committed", "partitions", "run", "torn")
if not found[1] or not found[3] then
  return {"gone", -1, "", ARGV[1]}
end
if tonumber(found[5] or "0") ~= 0 then
  return {"torn", -1, "meta", ""}
end
local stored = tonumber(found[1])
if stored > generation then
  return {"superseded", -1, found[1], ARGV[1]}
elseif stored < generation then
  return {"lost", -3, found[1], ARGV[1]}
end
if found[4] and found[4] ~= ARGV[2] then
  -- the same generation, started by another driver: the namespace was reset or lost meanwhile
  return {"superseded", -1, found[1] .. " of " .. found[4], ARGV[1]}
end
local holder = redis.call("GET", lock)
if holder and holder ~= ARGV[2] then
  return {"superseded", -2, holder, ARGV[2]}
end
if ARGV[4] ~= "" and (found[2] or "-1") ~= ARGV[4] then
  return {"lost", -1, found[2] or "-1", ARGV[4]}
end
local partitions = tonumber(ARGV[5])
if tonumber(found[3]) ~= partitions then
  return {"lost", -5, found[3], ARGV[5]}
end
for p = 1, partitions do
  local progress = redis.call("HMGET", KEYS[5 + p], "generation", "applied", "torn")
  if tonumber(progress[3] or "0") ~= 0 then
    return {"torn", p - 1, "progress", ""}
  end
  local owner = tonumber(progress[1] or "-1")
  if owner > generation then
    return {"superseded", p - 1, progress[1], ARGV[1]}
  end
  if owner < generation then
    return {"lost", p - 1, "generation " .. (progress[1] or "-1"), "generation " .. ARGV[1]}
  end
  if tonumber(progress[2] or "-1") < tonumber(ARGV[5 + p]) then
    return {"lost", p - 1, progress[2] or "-1", ARGV[5 + p]}
  end
end
local stream = KEYS[6 + 2 * partitions]
if stream then
  -- checked here: an XADD failing below would leave the record half written
  local kind = redis.call("TYPE", stream)["ok"]
  if kind ~= "none" and kind ~= "stream" then
    return {"wrongtype", -4, kind, "stream"}
  end
end

-- Every check passed: only writes that cannot fail from here on. The first and the last
-- mark the record whole (tasks/store.py TORN): Redis replicates a script's writes as one
-- MULTI/EXEC block, and may run part of one after a crash.
redis.call("HINCRBY", meta, "torn", 1)
redis.call("SET", lock, ARGV[2], "PX", ARGV[3])
local i = 6 + partitions
local n = tonumber(ARGV[i])
if n > 0 then
  redis.call("HSET", meta, unpack(ARGV, i + 1, i + 2 * n))
end
i = i + 2 * n + 1
if ARGV[i] ~= "" then
  redis.call("ZADD", KEYS[3], ARGV[i + 1], ARGV[i])
end
i = i + 2
n = tonumber(ARGV[i])
if n >= 0 then
  redis.call("DEL", KEYS[5])
  if n > 0 then
    redis.call("HSET", KEYS[5], unpack(ARGV, i + 1, i + 2 * n))
  end
  i = i + 2 * n + 1
else
  i = i + 1
end
n = tonumber(ARGV[i])
for d = 1, n do
  local at = i + 1 + (d - 1) * 10
  redis.call("XADD", KEYS[4], "*", unpack(ARGV, at, at + 9))
end
i = i + 1 + 10 * n
if ARGV[i] ~= "" then
  local retained_from = tonumber(ARGV[i])
  for p = 1, partitions do
    redis.call("ZREMRANGEBYSCORE", KEYS[5 + partitions + p], "-inf", "(" .. retained_from)
  end
  -- Keep the checkpoint at or before retained_from: replay from there seeks from it.
  local floor = redis.call("ZREVRANGEBYSCORE", KEYS[3], retained_from, "-inf", "LIMIT", 0, 1)
  if floor[1] then
    local epoch = string.match(floor[1], "^(%d+):")
    redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", "(" .. epoch)
  end
  redis.call("HSET", meta, "retained_from", retained_from)
end
if stream then
  i = i + 1
  drop_after(stream, tonumber(ARGV[i]))
  n = tonumber(ARGV[i + 2])
  for e = 1, n do
    local at = i + 1 + 2 * e
    redis.call("XADD", stream, "*", "epoch", ARGV[at], "output", ARGV[at + 1])
  end
  if ARGV[i + 1] ~= "" then
    redis.call("XTRIM", stream, "MAXLEN", ARGV[i + 1])
  end
end
redis.call("HINCRBY", meta, "torn", -1)
return {"ok"}
