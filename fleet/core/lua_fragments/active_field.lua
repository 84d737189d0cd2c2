-- The field of a tenant's runs of a class in the tenants' active counts (fleet.keys.active_field).
local function active_field(tenant, priority)
  return (tenant or 'default') .. '|' .. (priority or 'batch')
end
