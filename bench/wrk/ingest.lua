-- wrk script: POST realistic PPG batches to /ingestion/ppg, one unique seq per request.
--
-- Environment (all optional):
--   PULSECAL_DEVICES   file with one "device_id token" per line; each request goes to the next
--                      device of the thread's rotation, with that device's bearer token.
--                      Default: 16 made-up devices with a dummy token (fine for the peers).
--   PULSECAL_SEQ_BASE  first seq of this run (default 0). Thread t uses
--                      base + t * 10^10 + n, so threads never collide and a caller that moves the
--                      base by 10^12 per run never repeats a seq either.
--   PULSECAL_SAMPLES   samples per batch (default 50, at 50 Hz: about 1.1 KB of JSON).
--
-- done() prints one line "PULSECAL_WRK_JSON {...}" with the totals and latency percentiles
-- (microseconds) for the harness to parse; run wrk with --latency for the human summary.

local THREAD_STRIDE = 1e10
local RATE_HZ = 50
local VARIANTS = 16

local next_thread_id = 0
local threads = {}

function setup(thread)
   thread:set("thread_id", next_thread_id)
   next_thread_id = next_thread_id + 1
   table.insert(threads, thread)
end

local devices = {}
local bodies_mid = {}
local seq = 0
local ts0 = 0
local n = 0

local function load_devices()
   local path = os.getenv("PULSECAL_DEVICES")
   local list = {}
   if path and path ~= "" then
      local f = assert(io.open(path, "r"))
      for line in f:lines() do
         local id, token = line:match("^%s*(%S+)%s+(%S+)%s*$")
         if id then
            table.insert(list, { id = id, token = token })
         end
      end
      f:close()
      assert(#list > 0, "no devices in " .. path)
   else
      for i = 0, 15 do
         table.insert(list, { id = string.format("bench-%03d", i), token = "pct_dummy" })
      end
   end
   return list
end

-- One synthetic PPG window: a pulse wave around 1.2 Hz with breathing drift and noise,
-- printed with full double precision as a device's JSON encoder would.
local function ppg_samples(count, phase)
   local out = {}
   for i = 0, count - 1 do
      local t = i / RATE_HZ + phase
      local v = 0.5 + 0.3 * math.sin(2 * math.pi * 1.2 * t)
         + 0.08 * math.sin(2 * math.pi * 2.4 * t + 0.7)
         + 0.05 * math.sin(2 * math.pi * 0.25 * t)
         + (math.random() - 0.5) * 0.02
      out[#out + 1] = string.format("%.17g", v)
   end
   return "[" .. table.concat(out, ",") .. "]"
end

function init(args)
   math.randomseed(os.time() + thread_id * 7919)
   local samples = tonumber(os.getenv("PULSECAL_SAMPLES") or "") or 50
   local base = tonumber(os.getenv("PULSECAL_SEQ_BASE") or "") or 0
   seq = base + thread_id * THREAD_STRIDE
   ts0 = os.time() * 1000
   local list = load_devices()
   -- Rotate the device list per thread so threads start on different devices.
   for i = 1, #list do
      local d = list[((i - 1 + thread_id) % #list) + 1]
      devices[i] = {
         head = '{"device_id":"' .. d.id .. '","seq":',
         headers = {
            ["Authorization"] = "Bearer " .. d.token,
            ["Content-Type"] = "application/json",
         },
      }
   end
   for k = 1, VARIANTS do
      local hr = 60 + math.random() * 40
      local spo2 = 95 + math.random() * 4
      bodies_mid[k] = string.format(
         ',"rate_hz":%d,"ppg":%s,"hr":%.1f,"spo2":%.1f}', RATE_HZ,
         ppg_samples(samples, math.random() * 10), hr, spo2)
   end
end

function request()
   n = n + 1
   local d = devices[(n % #devices) + 1]
   local body = d.head .. string.format("%.0f", seq + n)
      .. ',"ts":' .. string.format("%.0f", ts0 + n * 1000)
      .. bodies_mid[(n % VARIANTS) + 1]
   return wrk.format("POST", "/ingestion/ppg", d.headers, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'PULSECAL_WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,'
         .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
end
