-- Argo CD health check for finetune.dev/FineTuneJob.
-- Conditions are the truth; status.phase is the fallback summary.
--   Failed=True     -> Degraded (with the Failed condition's reason and message)
--   Succeeded=True  -> Healthy
--   Suspended=True  -> Suspended
--   Pending, ValidatingData, Running, or no status yet -> Progressing
-- Written for gopher-lua (Lua 5.1), which Argo CD embeds.
local hs = {}

local function condition(ctype)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(ctype)
  local c = condition(ctype)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local msg = c.message
  if msg == nil or msg == "" then
    msg = fallback
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason .. ": " .. msg
  end
  return msg
end

local function progress_message(phase)
  local p = obj.status.progress
  local parts = { phase }
  if p ~= nil then
    if p.step ~= nil and p.totalSteps ~= nil then
      table.insert(parts, string.format("step %d/%d", math.floor(p.step), math.floor(p.totalSteps)))
    end
    if p.percent ~= nil then
      table.insert(parts, string.format("%.0f%%", p.percent))
    end
    if p.loss ~= nil then
      table.insert(parts, string.format("loss %.4g", p.loss))
    end
    if p.eta ~= nil and p.eta ~= "" then
      table.insert(parts, "ETA " .. p.eta)
    end
  end
  return table.concat(parts, ", ")
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the FineTuneJob"
  return hs
end

local phase = obj.status.phase

if is_true("Failed") or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(condition("Failed"), "FineTuneJob failed")
  return hs
end

if is_true("Succeeded") or phase == "Succeeded" then
  hs.status = "Healthy"
  local msg = "Fine-tuning succeeded"
  local result = obj.status.result
  if result ~= nil and result.adapterUri ~= nil then
    msg = msg .. "; adapter at " .. result.adapterUri
  elseif result ~= nil and result.outputUri ~= nil then
    msg = msg .. "; output at " .. result.outputUri
  end
  hs.message = msg
  return hs
end

-- A spec change (e.g. suspend flipped) the operator has not acted on yet.
local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. string.format("%d", generation)
  return hs
end

if is_true("Suspended") or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(condition("Suspended"), "FineTuneJob is suspended")
  return hs
end

hs.status = "Progressing"
hs.message = progress_message(phase or "Pending")
return hs
