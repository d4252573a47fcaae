// Each role's own page, and the way there from a page of another role.
import { t } from "./i18n.js";
import "./i18n_admin.js";

export const HOME = { therapist: "/app", support: "/support", admin: "/admin" };
const PAGE_NAMES = {
  therapist: "home.therapist",
  support: "home.support",
  admin: "home.admin",
};

// Fill ``element`` with where this account's own page is, as a link.
export function showWayHome(element, role) {
  element.replaceChildren();
  if (!HOME[role]) return;
  element.append(t("home.yours"), " ");
  const link = document.createElement("a");
  link.href = HOME[role];
  link.textContent = t(PAGE_NAMES[role]);
  element.append(link);
}
