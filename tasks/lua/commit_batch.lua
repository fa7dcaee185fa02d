-- Commit one batch of one partition: state, undo record, progress marker and
-- the commit notice (with the batch's output lines), all or nothing.
--
-- KEYS[1] = meta hash of the namespace        (field "generation")
-- KEYS[2] = progress hash of the partition    (field "applied")
-- KEYS[3] = state hash of the partition       (key -> state JSON)
-- KEYS[4] = undo sorted set of the partition  (score = last epoch of a batch)
-- KEYS[5] = notice stream of the running driver
-- KEYS[6] = the batch's stored events (deleted: the batch is done)
-- ARGV[1] = generation of the batch
-- ARGV[2] = epoch the partition must have applied before this batch ("after")
-- ARGV[3] = epoch the partition has applied after this batch ("through")
-- ARGV[4] = undo record (JSON) or "" when the batch changed no state
-- ARGV[5] = commit notice (JSON), or "" when nobody waits for one
-- ARGV[6] = number n of states to set; ARGV[7 .. 6+2n] = key, state pairs;
--           ARGV[7+2n ..] = keys whose state is deleted
-- returns  1 committed
--          0 already committed (the partition has applied "through" or beyond)
--         -1 stale generation (a newer driver run owns the namespace)
--         -2 out of order (the partition has not applied "after" yet)
--
-- Every check comes before the first write: a script never rolls back.

local generation = redis.call('HGET', KEYS[1], 'generation')
if generation ~= ARGV[1] then
  return -1
end
local applied = tonumber(redis.call('HGET', KEYS[2], 'applied') or '-1')
local through = tonumber(ARGV[3])
if applied >= through then
  return 0
end
if applied ~= tonumber(ARGV[2]) then
  return -2
end

-- unpack() is limited to a few thousand values: write in chunks.
local function in_chunks(command, key, first, last, step)
  for i = first, last, step do
    redis.call(command, key, unpack(ARGV, i, math.min(i + step - 1, last)))
  end
end

local n = tonumber(ARGV[6])
local last_set = 6 + 2 * n
in_chunks('HSET', KEYS[3], 7, last_set, 1000)
in_chunks('HDEL', KEYS[3], last_set + 1, #ARGV, 1000)
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[4], through, ARGV[4])
end
redis.call('HSET', KEYS[2], 'applied', through)
redis.call('DEL', KEYS[6])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[5], '*', 'n', ARGV[5])
end
return 1
