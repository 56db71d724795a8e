#!lua

local function gcra(first, nw, shadow, params, now)
  local tats = {}
  local refused, wait = 0, 0
  for w = 1, nw do
    local limit = tonumber(ARGV[params + 2 * w - 2])
    local period = tonumber(ARGV[params + 2 * w - 1])
    local tat = tonumber(redis.call('GET', KEYS[first + w - 1])) or now
    if tat < now then tat = now end
    local new_tat = tat + period / limit
    local over = new_tat - now - period
    if over > 0 and over > wait then
      refused, wait = w, over
    end
    tats[w] = new_tat
  end
  if refused > 0 then
    if shadow == 0 then return 2, refused, 0, math.ceil(wait) end
    return 3, refused, 0, math.ceil(wait)
  end
  local best, remaining, reset = 1, nil, 0
  for w = 1, nw do
    local limit = tonumber(ARGV[params + 2 * w - 2])
    local period = tonumber(ARGV[params + 2 * w - 1])
    local ahead = tats[w] - now
    redis.call('SET', KEYS[first + w - 1], string.format('%.17g', tats[w]), 'PX', math.ceil(ahead))
    local left = math.floor((period - ahead) / (period / limit) + 1e-9)
    if remaining == nil or left < remaining then
      best, remaining, reset = w, left, math.ceil(ahead)
    end
  end
  return 1, best, remaining, reset
end

local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local stream = KEYS[1]
local window = tonumber(ARGV[1])
local keep_from = -1 - tonumber(ARGV[2])
local ttl = ARGV[3]
local received = ARGV[4]
local nw = tonumber(ARGV[5])
local shadow = tonumber(ARGV[6])
local items = 7 + 2 * nw
local stride = 1 + nw
local now = 0
if nw > 0 then now = redis_now_ms() end
local out = {}
for i = 0, (#KEYS - 1) / stride - 1 do
  local seen = KEYS[2 + i * stride]
  local verdict, w, remaining, reset = 0, 0, 0, 0
  if nw > 0 then
    verdict, w, remaining, reset = gcra(3 + i * stride, nw, shadow, 7, now)
  end
  local stored = -1
  if verdict ~= 2 then
    local seq = ARGV[items + 3 * i]
    if redis.call('ZADD', seen, 'NX', seq, seq) == 1 then
      local trace = ARGV[items + 3 * i + 2]
      if trace == '' then
        redis.call('XADD', stream, '*', 'd', ARGV[items + 3 * i + 1], 'r', received)
      else
        redis.call('XADD', stream, '*', 'd', ARGV[items + 3 * i + 1], 'r', received,
          't', trace)
      end
      local held = redis.call('ZCARD', seen)
      if held == 1 or held > window then
        redis.call('ZREMRANGEBYRANK', seen, 0, keep_from)
        redis.call('EXPIRE', seen, ttl)
      end
      stored = 1
    else
      stored = 0
    end
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = stored, verdict, w, remaining, reset
end
return out
