-- Start a run on a namespace: take the next generation and claim every partition for it,
-- unless another driver got there first.
--
-- KEYS[1] = <ns>:meta   KEYS[2] = <ns>:driver (the lock)   KEYS[3] = <ns>:checkpoints
-- KEYS[4] = <ns>:dead-letters   KEYS[5 .. 4+P] = <ns>:p<p>:progress
--
-- ARGV[1] = the driver's lock token   ARGV[2] = lock TTL (ms)
-- ARGV[3] = the generation the driver read when it planned the run (0 = none yet)
-- ARGV[4] = the run's first epoch: dead letters of it and later epochs, and checkpoints
--           after it, are dropped (the run records them again)
-- ARGV[5] = the server's time in milliseconds: a namespace's first generation, so that
--           generations never repeat, even after a reset or a restart that lost the namespace
--           (a driver that wakes up late must never find its batch and job names reused)
-- ARGV[6 ..] = meta field/value pairs to set (partitions, flow, input, ...); the output file
--              fields are cleared first (a run without one sets none); the run's token is
--              recorded as `run`
--
-- Returns {"ok", generation}, or writes nothing and returns {"superseded", what}:
-- another driver holds the lock, or started a run since the driver planned this one.

local meta, lock = KEYS[1], KEYS[2]
local holder = redis.call("GET", lock)
if holder and holder ~= ARGV[1] then
  return {"superseded", holder}
end
local current = redis.call("HGET", meta, "generation") or "0"
if current ~= ARGV[3] then
  return {"superseded", "generation " .. current}
end

-- The first and the last write mark the script's writes whole (tasks/store.py TORN).
redis.call("HINCRBY", meta, "torn", 1)
redis.call("SET", lock, ARGV[1], "PX", ARGV[2])
local generation
if current == "0" then
  generation = tonumber(ARGV[5])
  redis.call("HSET", meta, "generation", ARGV[5])
else
  generation = redis.call("HINCRBY", meta, "generation", 1)
end
redis.call("HDEL", meta, "output", "output_length")
redis.call("HSET", meta, "run", ARGV[1])
if #ARGV > 5 then
  redis.call("HSET", meta, unpack(ARGV, 6, #ARGV))
end
for k = 5, #KEYS do
  redis.call("HSET", KEYS[k], "generation", generation)
end
redis.call("ZREMRANGEBYSCORE", KEYS[3], "(" .. ARGV[4], "+inf")
local start = tonumber(ARGV[4])
while true do
  local page = redis.call("XREVRANGE", KEYS[4], "+", "-", "COUNT", 500)
  local older = false
  for _, entry in ipairs(page) do
    local fields, epoch = entry[2], nil
    for j = 1, #fields, 2 do
      if fields[j] == "epoch" then
        epoch = tonumber(fields[j + 1])
      end
    end
    if epoch == nil or epoch < start then
      older = true
      break
    end
    redis.call("XDEL", KEYS[4], entry[1])
  end
  if older or #page < 500 then
    break
  end
end
redis.call("HINCRBY", meta, "torn", -1)
return {"ok", generation}
