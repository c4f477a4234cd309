-- wrk script: pipelined PURGEs with varying paths, the ceiling that bench/sender_bench.py compares purged to.
--
--   wrk -t1 -c2 -d5s -s bench/wrk_pipeline.lua http://127.0.0.1:6081 -- 64
--
-- The argument after "--" is the pipeline depth (requests written per batch; default 64). This is the standard
-- wrk pipeline.lua pattern: init() builds the concatenated requests once, request() returns one batch, and wrk
-- writes the next batch on a connection once every response of the previous one arrived. Each thread cycles
-- through 256 pre-built batches, so the paths vary (depth x 256 distinct URLs per thread). done() prints one
-- JSON line (prefixed "WRK_JSON ") with wrk's own counters, so the caller can check them against Varnish's
-- MAIN.n_purges.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local batches = {}
local nbatches = 256
local cursor = 0

function init(args)
   local depth = tonumber(args[1]) or 64
   local id = wrk.thread:get("id") or 0
   for b = 1, nbatches do
      local reqs = {}
      for i = 1, depth do
         local path = string.format("/wiki/wrk_%d_%d_%d?action=raw", id, b, i)
         reqs[i] = wrk.format("PURGE", path, { ["Host"] = "en.wikipedia.org", ["User-Agent"] = "wrk" })
      end
      batches[b] = table.concat(reqs)
   end
end

function request()
   cursor = cursor % nbatches + 1
   return batches[cursor]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
end
