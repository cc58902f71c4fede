-- wrk script for benches/load/run.sh: after the run, the tail of the latency distribution
-- that wrk's --latency report leaves out: the 99.9th percentile and the share of responses
-- slower than 10 ms (stalls, not queueing: the median is around 1 ms in every case).
done = function(summary, latency, requests)
  local lo, hi = 0.0, 100.0
  if latency.max < 10000 then
    lo = 100.0
  else
    for _ = 1, 40 do
      local mid = (lo + hi) / 2
      if latency:percentile(mid) < 10000 then lo = mid else hi = mid end
    end
  end
  io.write(string.format("TAIL p999_us %d over10ms_pct %.3f\n", latency:percentile(99.9), 100.0 - lo))
end
